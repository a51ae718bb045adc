"""vLLM benchmark: a dense folder vs its factored checkpoint, offline and served, same run.

The factored checkpoint runs twice: with the plugin's default CPU GEMMs (vLLM's own dense
kernel dispatch, oneDNN) and with ``FACTORLM_VLLM_CPU_GEMM=torch``.

Offline: ``vllm.LLM`` generates ``--max-tokens`` greedy tokens (EOS ignored) for batches of
1 and ``--batch`` prompts; output tokens/s is the median of ``--repeats`` timed runs after
a warm-up. Served: ``factorlm serve DIR --engine vllm`` on 127.0.0.1, then the streaming
load generator at each ``--concurrency`` (vLLM serving-benchmark metric names). Each
engine runs in its own process with vLLM's defaults apart from the flags printed in the
result. Also reports the weight bytes each decode step reads (every weight once; a tied
embedding once, as lm_head) and their dense/factored ratio. Results go to
benchmarks/results/vllm_<tag>.{json,md}; the script ends with one JSON line.

    python benchmarks/bench_vllm.py --dense sample --factored DIR --concurrency 1 4 16 --tag cpu-keep0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_serving import PROMPTS  # the same prompts as the served benchmark

RESULTS = Path(__file__).parent / "results"
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]  # plus --max-model-len


def weight_bytes(model_dir: Path) -> int:
    """Bytes of every tensor in the folder's safetensors (what one decode step reads)."""
    from safetensors import safe_open

    from factorlm.runtime.checkpoint import safetensors_files

    total = 0
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
    return total


# --------------------------------------------------------------------------- offline (child process)


def offline_child(model_dir: str, batch: int, max_tokens: int, repeats: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0,
              max_num_seqs=max(batch, 1))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out: dict = {}
    for size in sorted({1, batch}):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
        out[f"batch{size}_output_tok_s"] = statistics.median(rates)
        out[f"batch{size}_runs"] = rates
    return out


def run_offline(model_dir: Path, batch: int, max_tokens: int, repeats: int, max_model_len: int,
                env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--offline-child", str(model_dir), "--batch", str(batch),
               "--max-tokens", str(max_tokens), "--repeats", str(repeats), "--max-model-len", str(max_model_len)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"offline run failed for {model_dir}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# --------------------------------------------------------------------------- served


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra)
    return env


def run_served(model_dir: Path, concurrency: list[int], prompts_per_level: int, max_tokens: int,
               max_model_len: int, env: dict[str, str]) -> list[dict]:
    from factorlm.bench.loadgen import run_load, wait_until_healthy
    from factorlm.runtime.format import FactorlmError

    port = _free_port()
    command = [sys.executable, "-m", "factorlm.cli", "serve", str(model_dir), "--engine", "vllm", "--port", str(port),
               "--served-model-name", "bench", "--max-num-seqs", str(max(concurrency)), *ENGINE_FLAGS,
               "--max-model-len", str(max_model_len)]
    log = open(Path(tempfile.gettempdir()) / f"bench_vllm_server_{port}.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(base, server, 600, log.name, poll_s=2)
        except FactorlmError as exc:
            raise SystemExit(f"vLLM {exc}") from None
        asyncio.run(run_load(base, "bench", PROMPTS[:2], max_tokens=8, concurrency=2))  # warm-up
        rows = []
        for c in concurrency:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(prompts_per_level, 2 * c))]
            rows.append(asyncio.run(run_load(base, "bench", prompts, max_tokens=max_tokens, concurrency=c)))
        return rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# --------------------------------------------------------------------------- report


def markdown(out: dict) -> str:
    names = [n for n in out["variants"] if n != "dense"]
    d = out["dense"]
    lines = [f"# vLLM benchmark `{out['tag']}`", "",
             f"Command: `{out['command']}`  ",
             f"vLLM {out['vllm_version']}, {out['machine']}, {out['cpus']} CPUs; load average at start "
             f"{out['loadavg_start']}, at end {out['loadavg_end']}  ",
             f"Engine flags (all models): `{' '.join(out['engine_flags'])}`; greedy, {out['max_tokens']} new tokens  ",
             "Variants: " + "; ".join(f"`{n}`: {out['variants'][n]}" for n in out["variants"]), "",
             "| | dense | " + " | ".join(names) + " | " + " | ".join(f"{n}/dense" for n in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]

    def row(label: str, get) -> None:
        vals = [get(out[n]) for n in ["dense", *names]]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + " | "
                     + " | ".join(f"{v / vals[0]:.3f}" for v in vals[1:]) + " |")

    row("weight MB read per decode step", lambda r: r["weight_bytes"] / 1e6)
    for key in sorted(k for k in d["offline"] if k.endswith("_tok_s")):
        row(f"offline {key.replace('_output_tok_s', '')} output tok/s", lambda r, k=key: r["offline"][k])
    for i, rd in enumerate(d["served"]):
        c = rd["max_concurrency"]
        row(f"served c={c} output tok/s", lambda r, i=i: r["served"][i]["output_throughput"])
        row(f"served c={c} median TPOT ms", lambda r, i=i: r["served"][i]["median_tpot_ms"])
        row(f"served c={c} median TTFT ms", lambda r, i=i: r["served"][i]["median_ttft_ms"])
    lines += ["", f"Bytes ratio dense/factored: {out['bytes_ratio']:.3f}. Targets of the integration issue "
              "(reported, not asserted):", ""]
    for name, value in out["targets"].items():
        lines.append(f"- {name}: {value}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="sample", help="dense model folder (or 'sample')")
    ap.add_argument("--factored", help="factored checkpoint of the same model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--num-prompts", type=int, default=16, help="requests per concurrency level (at least 2x it)")
    ap.add_argument("--batch", type=int, default=16, help="offline batch size (besides 1)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--tag", default="cpu-keep0.5")
    ap.add_argument("--offline-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_child:
        print("RESULT " + json.dumps(offline_child(args.offline_child, args.batch, args.max_tokens, args.repeats,
                                                       args.max_model_len)))
        return 0
    if not args.factored:
        ap.error("--factored is required")
    import vllm

    from factorlm.cli.common import resolve_model_path

    RESULTS.mkdir(exist_ok=True)
    folders = {"dense": resolve_model_path(args.dense), "factored": resolve_model_path(args.factored)}
    out: dict = {"tag": args.tag, "vllm_version": vllm.__version__, "machine": platform.machine(),
                 "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                 "max_tokens": args.max_tokens,
                 "engine_flags": [*ENGINE_FLAGS, "--max-model-len", str(args.max_model_len)],
                 "command": ("python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:])).replace(
                     str(Path.home()), "~")}
    variants = {"dense": (folders["dense"], {}), "factored": (folders["factored"], {}),
                "factored-torchgemm": (folders["factored"], {"FACTORLM_VLLM_CPU_GEMM": "torch"})}
    out["variants"] = {"dense": "vLLM's dense CPU GEMMs (oneDNN, prepacked)",
                       "factored": "each factor GEMM through vLLM's dense CPU GEMM dispatch (default)",
                       "factored-torchgemm": "FACTORLM_VLLM_CPU_GEMM=torch (torch GEMM on column-major factors)"}
    for name, (folder, extra) in variants.items():
        out[name] = {"weight_bytes": weight_bytes(folder)}
    for name, (folder, extra) in variants.items():
        print(f"offline: {name}", file=sys.stderr, flush=True)
        out[name]["offline"] = run_offline(folder, args.batch, args.max_tokens, args.repeats, args.max_model_len,
                                           _env(extra))
    for name, (folder, extra) in variants.items():
        print(f"served: {name}", file=sys.stderr, flush=True)
        out[name]["served"] = run_served(folder, args.concurrency, args.num_prompts, args.max_tokens,
                                         args.max_model_len, _env(extra))
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["bytes_ratio"] = out["dense"]["weight_bytes"] / out["factored"]["weight_bytes"]
    targets = {}
    for name in ("factored", "factored-torchgemm"):
        served = {r["max_concurrency"]: (r, q) for r, q in zip(out["dense"]["served"], out[name]["served"])}
        if 16 in served:
            ratio = served[16][1]["output_throughput"] / served[16][0]["output_throughput"]
            targets[f"{name}: served c=16 output throughput >= 1.5x dense"] = \
                f"{ratio:.3f} ({'met' if ratio >= 1.5 else 'not met'})"
        if 1 in served:
            ratio = served[1][1]["output_throughput"] / served[1][0]["output_throughput"]
            need = 0.9 * out["bytes_ratio"]
            targets[f"{name}: served c=1 output throughput >= 0.9 x bytes ratio = {need:.3f}"] = \
                f"{ratio:.3f} ({'met' if ratio >= need else 'not met'})"
    out["targets"] = targets
    for suffix, render in (("json", lambda: json.dumps(out, indent=2)), ("md", lambda: markdown(out))):
        tmp = RESULTS / f".vllm_{args.tag}.{suffix}.tmp"
        tmp.write_text(render())
        tmp.replace(RESULTS / f"vllm_{args.tag}.{suffix}")
    text = markdown(out)
    print(text)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
