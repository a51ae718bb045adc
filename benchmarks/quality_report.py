"""Report half of benchmarks/bench_quality.py: the table rows, the Markdown table, the plot.

Kept apart so the grid runner stays readable; entries are the dicts bench_quality builds
(name, dir, compress metadata, scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


# --- rows -----------------------------------------------------------------------------------

def above_chance_retention(tasks: dict[str, Any], dense_tasks: dict[str, Any], chance: dict[str, float]) -> float | None:
    """sum over tasks of (acc - chance) / sum of (dense acc - chance): how much of the dense model's
    margin over guessing survives (retention itself counts the guessing floor as kept)."""
    if not chance or set(tasks) != set(dense_tasks) or not set(tasks) <= set(chance):
        return None
    margin = sum(dense_tasks[t]["acc"] - chance[t] for t in tasks)
    return sum(tasks[t]["acc"] - chance[t] for t in tasks) / margin if margin > 0 else None


def report_rows(entries: list[dict[str, Any]], dense_params: int,
                chance: dict[str, float] | None = None) -> list[dict[str, Any]]:
    dense_avg = next((e["scores"]["zeroshot"]["average"] for e in entries if e["name"] == "dense"), None)
    dense_tasks = next((e["scores"]["zeroshot"]["tasks"] for e in entries if e["name"] == "dense"), {})
    for e in entries:
        s = e.get("scores")
        if not s:
            continue
        e["model_removed"] = 1 - s["params"] / dense_params
        rep = Path(e["dir"]) / "factorlm_report.json" if e.get("dir") else None
        totals = json.loads(rep.read_text()).get("totals", {}) if rep and rep.is_file() else {}
        e["method"] = "dense" if e["name"] == "dense" else totals.get("method")
        e["linear_keep"] = 1.0 if e["name"] == "dense" else totals.get("linear_keep")
        e["allocation"] = totals.get("allocation")
        e["dense_modules"] = totals.get("dense_modules")
        e["allocation_s"] = totals.get("allocation_time_s")
        e["correctors"] = (totals.get("hooks") or {}) if "corrector_params" in (totals.get("hooks") or {}) else None
        avg = s["zeroshot"]["average"]
        e["retention"] = avg / dense_avg if dense_avg else None
        if chance:
            e["above_chance"] = above_chance_retention(s["zeroshot"]["tasks"], dense_tasks, chance)
    return entries


def flat_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per scored model (the shape benchmarks/plots.py reads from quality_*.json)."""
    rows = []
    for e in entries:
        if not e.get("scores"):
            continue
        zs = e["scores"]["zeroshot"]
        rows.append({"config": e["name"], "method": e.get("method") or e["name"],
                     "linear_kept_actual": e.get("linear_keep"), "model_params_removed": e.get("model_removed"),
                     "wikitext2_ppl": e["scores"]["ppl"], "zeroshot_avg": zs["average"],
                     "retention": e.get("retention"), "retention_above_chance": e.get("above_chance"),
                     "allocation": e.get("allocation"),
                     "dense_modules": e.get("dense_modules"), "allocation_s": e.get("allocation_s"),
                     **{f"{t}_acc": r["acc"] for t, r in zs["tasks"].items()},
                     **{f"{t}_acc_norm": r["acc_norm"] for t, r in zs["tasks"].items() if r["acc_norm"] is not None}})
    return rows


def public(obj: Any, wiki: str) -> Any:
    """``obj`` with the home folder written as ``~`` and the WikiText path as ``WIKI`` (results are committed)."""
    text = json.dumps(obj).replace(str(Path.home()), "~")
    return json.loads(text.replace(json.dumps(wiki)[1:-1], "WIKI") if wiki else text)


def avg_stderr(zs: dict[str, Any]) -> float | None:
    """Standard error of the task-averaged acc, treating tasks as independent samples."""
    ses = [r["acc_stderr"] for r in zs["tasks"].values()]
    if not ses or any(se is None for se in ses):
        return None
    return sum(se * se for se in ses) ** 0.5 / len(ses)


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def corrector_cells(hooks: dict[str, Any] | None) -> list[str]:
    """Corrector parameters (corrected modules) and where the corrector time went, from the compress report."""
    if not hooks:
        return ["-", "-"]
    sec = hooks.get("seconds", {})
    split = " / ".join(_f(sec.get(k), ".0f") for k in ("init", "layer", "block", "distill"))
    return [f"{hooks['corrector_params']:,} ({hooks.get('corrected_modules', '-')})", split]


def write_markdown(path: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    tasks = meta["settings"]["tasks"]
    head = ["config", "model params removed %", "linear kept %", "WikiText-2 ppl",
            *[f"{t} acc / norm" for t in tasks], "avg acc ± se", "retention",
            *(["retention above chance"] if meta.get("chance") else []), "allocation (dense modules)",
            "allocation s", "compress wall s", "compress CPU s", "compress peak MiB"]
    corrected = any(e.get("correctors") for e in entries)
    if corrected:
        head += ["corrector params (modules)", "corrector s init / layer / block / distill"]
    tuned = any("finetune" in e for e in entries)
    if tuned:
        head += ["finetune s", "held-out KL before -> after"]
    lines = [f"# Quality: {meta['name']}", "",
             "- model: SmolLM2-135M-Instruct fp32 (factorlm sample-model), dense = the dequantized checkpoint",
             f"- calibration: {meta['calibration']}",
             f"- perplexity: WikiText-2 raw test file, first {meta['settings']['ppl_tokens']} tokens, "
             "non-overlapping 2048-token windows",
             f"- zero-shot: {meta['zeroshot_note']}",
             "- retention = avg acc / dense avg acc; avg acc = mean of acc over the tasks (acc_norm not mixed in); "
             "se = its standard error (task stderrs combined as independent)",
             *(["- chance (uniform guessing on the scored rows): "
                + ", ".join(f"{t} {c:.3f}" for t, c in meta["chance"].items())
                + f", average {sum(meta['chance'].values()) / len(meta['chance']):.3f}; retention above chance = "
                "sum over tasks of (acc - chance) / sum of (dense acc - chance), the share of the dense model's "
                "margin over guessing that survives"] if meta.get("chance") else []),
             f"- cpu: {meta['cpu']}, torch threads {meta['settings']['threads']}, load average at start "
             f"{meta['load_start']}, at end {meta['load_end']}; total wall {meta['wall_s']:.0f} s",
             *([f"- note: {meta['note']}"] if meta.get("note") else []),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['name']} | failed: {e['error']} |" + " |" * (len(head) - 2))
            continue
        s, zs = e["scores"], e["scores"]["zeroshot"]["tasks"]
        cells = [e["name"], _f(100 * e["model_removed"], ".2f"), _f(e["linear_keep"] and 100 * e["linear_keep"], ".1f"),
                 _f(s["ppl"], ".3f" if s["ppl"] < 1e4 else ".4g")]
        cells += [f"{zs[t]['acc']:.3f} / {_f(zs[t]['acc_norm'], '.3f')}" for t in tasks]
        c = e.get("compress", {})
        se = avg_stderr(s["zeroshot"])
        cells += [_f(s["zeroshot"]["average"], ".4f") + (f" ± {se:.3f}" if se is not None else ""),
                  _f(e["retention"], ".3f"), *([_f(e.get("above_chance"), ".3f")] if meta.get("chance") else []),
                  "-" if not e.get("allocation") else f"{e['allocation']} ({e.get('dense_modules', 0)})",
                  _f(e.get("allocation_s"), ".1f"), _f(c.get("wall_s"), ".1f"),
                  _f(c.get("cpu_s"), ".1f"), _f(c.get("peak_rss_mib"), ".0f")]
        if corrected:
            cells += corrector_cells(e.get("correctors"))
        if tuned:
            ft = e.get("finetune", {})
            kl = ft.get("held_out_kl")
            cells += [_f(ft.get("wall_s"), ".1f"), f"{kl[0]:.4f} -> {kl[1]:.4f}" if kl else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "n per task and standard errors are in the JSON file. Commands:", "",
              f"    {meta['command']}"]
    for e in entries:
        lines += [f"    {e[k]['command']}" for k in ("compress", "finetune") if e.get(k, {}).get("command")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(path: Path, entries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in entries if e.get("scores")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for e in ok:
        x = 100 * (1 - e["model_removed"])
        a1.errorbar(x, e["scores"]["zeroshot"]["average"], yerr=avg_stderr(e["scores"]["zeroshot"]), fmt="o",
                    capsize=3)
        a1.annotate(e["name"], (x, e["scores"]["zeroshot"]["average"]), fontsize=7)
        a2.scatter(x, e["scores"]["ppl"])
        a2.annotate(e["name"], (x, e["scores"]["ppl"]), fontsize=7)
    a1.set_xlabel("model parameters kept %"), a1.set_ylabel("zero-shot avg acc")
    a2.set_xlabel("model parameters kept %"), a2.set_ylabel("WikiText-2 perplexity"), a2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
