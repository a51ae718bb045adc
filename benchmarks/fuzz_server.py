"""Property-based fuzz of the server's OpenAPI schema (schemathesis + hypothesis), bounded.

Every operation of /openapi.json is fuzzed with schema-valid (positive) and schema-violating
(negative) inputs against a live server over a tiny in-code model on 127.0.0.1. Two thirds of the
bodies get the served model name, and a third also lose the parameters the server rejects
by design (penalties, tools, ...), so that generation paths run too. The run fails if
any response is a 5xx. Results: JSON + Markdown under benchmarks/results/.

    python benchmarks/fuzz_server.py --examples 200
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "tiny"
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "echo", "suffix",
               "best_of", "tools", "tool_choice", "response_format", "parallel_tool_calls")


def adjust(body: dict[str, Any], how: str) -> None:
    """'model': use the served model name; 'clean': also drop parameters the server rejects by design."""
    if how == "raw" or "model" not in body:
        return
    body["model"] = MODEL
    if how == "clean":
        for key in UNSUPPORTED:
            body.pop(key, None)
        if not body.get("stream"):
            body.pop("stream_options", None)
        if "top_logprobs" in body and not body.get("logprobs"):
            body.pop("top_logprobs")
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                body[key] = min(body[key], 16)


def fuzz(url: str, examples: int, seed: int) -> dict[str, Any]:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, Any]] = []
    reasons: collections.Counter[str] = collections.Counter()
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
            @given(case=strategy, how=st.sampled_from(["raw", "model", "clean"]))
            @hypothesis.seed(seed)
            def check(case: Any, how: str) -> None:
                if isinstance(case.body, dict):
                    adjust(case.body, how)
                response = case.call(base_url=url, timeout=120)
                count["n"] += 1
                statuses[f"{key} -> {response.status_code}"] += 1
                if 400 <= response.status_code < 500 and mode == GenerationMode.POSITIVE and how == "clean":
                    try:
                        message = str(response.json()["error"]["message"])
                    except Exception:
                        message = response.text
                    reasons[message.split(":")[0][:60]] += 1
                if response.status_code >= 500:
                    failures.append({"operation": key, "status": response.status_code,
                                     "body": case.body if isinstance(case.body, (dict, list, str)) else repr(case.body),
                                     "response": response.text[:500]})

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass
            ran[key] = count["n"]
            print(f"{key}: {count['n']} requests", file=sys.stderr)
    return {"requests_per_operation": ran, "statuses": dict(sorted(statuses.items())),
            "total_requests": sum(ran.values()),
            "clean_positive_4xx_reasons": dict(reasons.most_common(15)), "count_5xx": len(failures), "failures_5xx": failures[:20]}


def metrics_errors(url: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("factorlm:request_errors_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def write_results(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))
    lines = [f"# Server fuzz ({result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"- requests: {result['total_requests']}, 5xx responses: **{result['count_5xx']}**",
             f"- 4xx counted by /metrics (factorlm:request_errors_total): {result['metrics_error_count']:.0f}",
             f"- wall time: {result['wall_s']:.1f} s; examples per operation and mode: {result['examples']}", "",
             "| operation -> status | responses |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["statuses"].items()]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out.with_suffix(".md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving_fuzz")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from factorlm.serving.app import create_app
    from factorlm.serving.server import BackgroundServer
    from factorlm.serving.torch_engine import TorchEngine
    from factorlm.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    engine = TorchEngine(model, tokenizer, model_name=MODEL, max_batch=16, max_queue=64)
    app = create_app(engine, max_tokens_limit=64)
    started = time.perf_counter()
    with BackgroundServer(app) as url:
        result = fuzz(url, args.examples, args.seed)
        result["metrics_error_count"] = metrics_errors(url)
        result["engine_alive_after"] = engine.alive()
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), wall_s=time.perf_counter() - started,
                  examples=args.examples, seed=args.seed, python=platform.python_version(),
                  command="python benchmarks/fuzz_server.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_results(result, args.out)
    print(f"{result['total_requests']} requests, {result['count_5xx']} 5xx; results in {args.out}.json/.md")
    return 1 if result["count_5xx"] or not result["engine_alive_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
