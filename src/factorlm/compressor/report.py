"""Reading and presenting a compression report (``factorlm_report.json``).

``format_report`` renders the per-layer rows and the totals as a plain-text table;
``plot_kept_fraction`` draws the kept parameter fraction per block and module as a heat
map (matplotlib with the Agg backend, written atomically).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError

REPORT_FILE = "factorlm_report.json"


def read_report(folder: str | Path) -> dict[str, Any]:
    """The report of a factored checkpoint folder (or a report file given directly)."""
    p = Path(folder)
    path = p / REPORT_FILE if p.is_dir() else p
    if not path.is_file():
        raise FactorlmError(f"{path}: no compression report (was this folder written by factorlm compress?)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FactorlmError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(report, dict) or "layers" not in report or "totals" not in report:
        raise FactorlmError(f"{path}: expected an object with 'layers' and 'totals'")
    return report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


COLUMNS = (("module", "module"), ("shape", "shape"), ("rank", "rank"), ("kept", "kept"),
           ("rel_output_error", "out err"), ("beta", "beta"), ("fallback", "fallback"), ("time_s", "time s"))


def layer_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings (header first) for the per-layer table."""
    table = [[title for _, title in COLUMNS]]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            if key == "shape":
                cells.append("x".join(map(str, row.get("shape", []))))
            elif key == "rank":
                cells.append("dense" if row.get("dense") else _fmt(row.get("rank")))
            elif key == "kept":
                before = row.get("params_before") or 0
                cells.append(f"{row.get('params_after', 0) / before:.3f}" if before else "-")
            elif key == "fallback":
                cells.append("yes" if row.get("fallback") else "-")
            else:
                cells.append(_fmt(row.get(key)))
        table.append(cells)
    return table


def format_report(report: dict[str, Any]) -> str:
    """The whole report as aligned text: one line per layer, then the totals."""
    table = layer_table(report["layers"])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report["totals"]
    lines.append("")
    lines.append(f"method: {report.get('method', t.get('method', '?'))}   allocation: "
                 f"{report.get('allocation', t.get('allocation', 'uniform'))}")
    if "linear_params_before" in t:
        lines.append(f"linear-layer parameters: {t['linear_params_before']:,} -> {t['linear_params_after']:,} "
                     f"(kept {t['linear_keep']:.1%})")
    if "model_params_before" in t:
        lines.append(f"whole-model parameters:  {t['model_params_before']:,} -> {t['model_params_after']:,} "
                     f"(kept {t['model_keep']:.1%}, removed {1 - t['model_keep']:.1%})")
    lines.append(f"modules: {t.get('factored_modules', '?')} factored, {t.get('dense_modules', '?')} kept dense")
    for key in ("mean_rel_output_error", "spectra_time_s", "allocation_time_s", "factorize_time_s", "wall_time_s"):
        if key in t:
            lines.append(f"{key}: {t[key]}")
    fallbacks = [r["module"] for r in report["layers"] if r.get("fallback")]
    if fallbacks:
        lines.append(f"whitening fallback used in {len(fallbacks)} layers: {', '.join(fallbacks[:5])}"
                     + (" ..." if len(fallbacks) > 5 else ""))
    if t.get("hooks"):
        lines.append(f"hooks: {json.dumps(t['hooks'])}")
    return "\n".join(lines)


def kept_grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[float | None]], list[list[bool]]]:
    """(row labels, module labels, kept fraction grid, dense flags) from module names ``...<block>.<sub>.<proj>``.

    The block index is the first all-digit component of the name; the rest is the module.
    """
    blocks: dict[str, dict[str, dict[str, Any]]] = {}
    modules: list[str] = []
    for row in rows:
        parts = row["module"].split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:
            continue
        block, module = parts[idx], ".".join(parts[idx + 1:]).split(".")[-1]
        blocks.setdefault(block, {})[module] = row
        if module not in modules:
            modules.append(module)
    labels = sorted(blocks, key=int)
    grid, dense = [], []
    for b in labels:
        grid.append([(blocks[b][m]["params_after"] / blocks[b][m]["params_before"]) if m in blocks[b] else None
                     for m in modules])
        dense.append([bool(blocks[b].get(m, {}).get("dense")) for m in modules])
    return labels, modules, grid, dense


def plot_kept_fraction(report: dict[str, Any], out: str | Path) -> Path:
    """Heat map of the kept fraction per block (rows) and module (columns); dense cells marked 'D'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, modules, grid, dense = kept_grid(report["layers"])
    if not labels:
        raise FactorlmError("the report has no per-block layers to plot")
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.0 + 0.28 * len(labels)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylabel("block")
    for i, row in enumerate(dense):
        for j, is_dense in enumerate(row):
            if is_dense:
                ax.text(j, i, "D", ha="center", va="center", color="black", fontsize=7)
    t = report.get("totals", {})
    ax.set_title(f"kept fraction: {report.get('method', '')} / {report.get('allocation', 'uniform')}, "
                 f"linear keep {t.get('linear_keep', float('nan')):.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, label="kept parameter fraction (D = dense)")
    fig.tight_layout()
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=dst.suffix or ".png", dir=dst.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return dst
