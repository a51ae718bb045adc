"""Fuzz of `factorlm serve` (torch and onnx engines): schema fuzz, invalid Unicode, hostile transport. No 5xx allowed.

For each engine the real CLI serves the model in its own process, with an API key and a
served model name that every case uses (so cases reach the handlers instead of stopping
at 401/404). Four families of cases:

- schema: schemathesis + hypothesis over /openapi.json, schema-valid and schema-violating
  bodies; two thirds get the served model name, a third also drop the parameters the
  server rejects by design, so generation runs too;
- unicode: hypothesis strings with lone surrogates and odd code points in every string
  field, sent as JSON escapes, as raw (CESU-8) surrogate bytes and with invalid UTF-8
  bytes; each 400 must leave the connection usable for the next request;
- transport: chunked bodies (small, oversize, malformed, half-sent), announced oversize
  bodies, half-sent bodies, unfinished or oversize headers, pipelining, over raw sockets;
- limits: 4 MB prompts, prompts longer than the context, n or prompts above --max-batch,
  deep nesting, NaN/Infinity, missing or wrong API key.

The run fails on any 5xx, seen by the client or counted in the server's /metrics, and if
the server is not healthy at the end. Results: JSON + Markdown under benchmarks/results/.

    python benchmarks/fuzz_server.py --model sample --engines torch onnx --examples 250
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fuzz_cases as cases  # noqa: E402
import _serving  # noqa: E402

UNSUPPORTED = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "echo", "suffix",
               "best_of", "tools", "tool_choice", "response_format", "parallel_tool_calls")
MAX_BATCH, MAX_TOKENS_LIMIT, BODY_TIMEOUT, HEADER_TIMEOUT = 16, 8, 2.0, 2.0


def adjust(body: dict[str, Any], how: str, model: str) -> None:
    """'model': use the served model name; 'clean': also drop parameters the server rejects by design."""
    if how == "raw" or "model" not in body:
        return
    body["model"] = model
    if how == "clean":
        for key in UNSUPPORTED:
            body.pop(key, None)
        if not body.get("stream"):
            body.pop("stream_options", None)
        if "top_logprobs" in body and not body.get("logprobs"):
            body.pop("top_logprobs")
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                body[key] = min(body[key], MAX_TOKENS_LIMIT)


def schema_fuzz(server: _serving.Server, examples: int, seed: int, record: cases.Recorder) -> dict[str, int]:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{op.method.upper()} {op.path} {mode.value}"
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception as exc:  # an operation without inputs has no negative cases
                ran[key] = 0
                print(f"{key}: skipped ({type(exc).__name__})", file=sys.stderr)
                continue
            count = {"n": 0}

            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            # hypothesis favours the first choice: most cases reach the handlers with the served name
            @given(case=strategy, how=st.sampled_from(["clean", "model", "raw"]))
            @hypothesis.seed(seed)
            def check(case: Any, how: str) -> None:
                if isinstance(case.body, dict):
                    adjust(case.body, how, server.model)
                response = case.call(base_url=server.url, headers=server.headers(), timeout=300)
                count["n"] += 1
                body = case.body if isinstance(case.body, (dict, list, str)) else repr(case.body)
                record.add("schema", f"{key}", response.status_code, body, response.text)
                if 400 <= response.status_code < 500 and mode == GenerationMode.POSITIVE and how == "clean":
                    try:
                        reason = str(response.json()["error"]["message"])
                    except Exception:
                        reason = response.text
                    record.reasons[reason.split(":")[0][:70]] += 1

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass
            ran[key] = count["n"]
            print(f"{key}: {count['n']} requests", file=sys.stderr, flush=True)
    return ran


def fuzz_engine(engine: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--max-batch", str(MAX_BATCH), "--max-queue", "64", "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
             "--body-timeout", str(BODY_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT)]
    record = cases.Recorder()
    started = time.perf_counter()
    with _serving.serve(folder, engine, threads=args.threads, extra=extra) as server:
        rss_start = _serving.rss_mib(server.pid)
        load_start = _serving.loadavg()
        ran = schema_fuzz(server, args.examples, args.seed, record)
        cases.unicode_fuzz(server, args.unicode_examples, args.seed, record)
        cases.limit_cases(server, MAX_BATCH, record)
        cases.transport_cases(server, BODY_TIMEOUT, HEADER_TIMEOUT, record)
        healthy = cases.healthy(server)
        result = record.summary()
        result.update(
            engine=engine, serve_command=server.command, schema_requests_per_operation=ran,
            server_5xx_in_metrics=server.metric_sum("factorlm:http_requests_total", status="5*"),
            server_errors_in_metrics=server.metric_sum("factorlm:request_errors_total"),
            healthy_after=healthy, rss_start_mib=rss_start, rss_end_mib=_serving.rss_mib(server.pid),
            loadavg_start=load_start, loadavg_end=_serving.loadavg(), wall_s=time.perf_counter() - started)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Server fuzz ({result['date']})", "", f"Command: `{result['command']}`", "",
             f"Model: {result['model']}. Python {result['python']}, one thread per server.", "",
             _serving.environment_line(result["environment"]), ""]
    for run in result["engines"]:
        lines += [f"## `--engine {run['engine']}`", "", f"Server: `{run['serve_command']}`", "",
                  f"- cases: **{run['total_cases']}**; 5xx seen by clients: **{run['count_5xx']}**; "
                  f"5xx counted in /metrics: **{run['server_5xx_in_metrics']:.0f}**; healthy after: "
                  f"{run['healthy_after']}",
                  f"- 4xx/5xx counted in /metrics (factorlm:request_errors_total): "
                  f"{run['server_errors_in_metrics']:.0f}",
                  f"- connections broken after a 400 (next request on a new connection): "
                  f"{run['connections_broken']}",
                  f"- server RSS start / end: {run['rss_start_mib']:.0f} / {run['rss_end_mib']:.0f} MiB (growth "
                  f"during the transport cases, 300 MiB chunked body included: "
                  f"{run['notes'].get('transport_rss_growth_mib', float('nan')):+.0f} MiB); "
                  f"load average start {run['loadavg_start']}, end {run['loadavg_end']}; wall {run['wall_s']:.0f} s",
                  "", "| family | case | outcome | count |", "|---|---|---|---:|"]
        lines += [f"| {family} | {case} | {outcome} | {n} |" for (family, case, outcome), n in
                  sorted((tuple(k.split(" | ")), v) for k, v in run["outcomes"].items())]
        if run["clean_positive_4xx_reasons"]:
            lines += ["", "Why schema-valid bodies with the served name and no rejected-by-design parameters still got "
                      "a 4xx (first words of the message):", ""]
            lines += [f"- {reason} ({n})" for reason, n in run["clean_positive_4xx_reasons"].items()]
        if run["failures"]:
            lines += ["", "Failures:", ""] + [f"- `{json.dumps(f)[:300]}`" for f in run["failures"][:10]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (in-code), 'sample' or a model folder")
    parser.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "onnx"])
    parser.add_argument("--examples", type=int, default=200, help="schema examples per operation and mode")
    parser.add_argument("--unicode-examples", type=int, default=150, help="invalid-Unicode examples per route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="server threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving_fuzz")
    args = parser.parse_args(argv)
    env = _serving.environment()

    runs = []
    with tempfile.TemporaryDirectory(prefix="factorlm-fuzz-") as tmp:
        folder, label = _serving.model_folder(args.model, Path(tmp))
        for engine in args.engines:
            served = _serving.onnx_export(folder, Path(tmp), args.threads) if engine == "onnx" else folder
            runs.append(fuzz_engine(engine, served, args))
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": label,
              "environment": env,
              "python": platform.python_version(), "examples": args.examples, "seed": args.seed,
              "command": "python benchmarks/fuzz_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "engines": runs}
    _serving.write_result(args.out, result, markdown(result))
    bad = [r for r in runs if r["count_5xx"] or r["server_5xx_in_metrics"] or not r["healthy_after"]]
    for r in runs:
        print(f"{r['engine']}: {r['total_cases']} cases, {r['count_5xx']} 5xx seen, "
              f"{r['server_5xx_in_metrics']:.0f} 5xx in /metrics, healthy after: {r['healthy_after']}")
    print(f"results in {args.out}.json/.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
