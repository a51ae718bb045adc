"""Quantized factors on the sample model: fp32 vs int8 vs int4 at the same ranks, vs dense fp32 and dense int8.

For every variant: WikiText-2 perplexity (the first ``--ppl-tokens`` tokens of the test
split, evaluation only), stored bytes (the safetensors files), and batch-1 / batch-8 greedy
decode tok/s on the torch runtime and ONNX Runtime, all in one run. Speed is interleaved:
per engine every variant is loaded, then each repeat times every variant in turn, and the
best repeat is kept, so load changes on a shared machine hit all variants alike.

Variants are built here from the source checkpoints (copied, never modified):
``factorlm quantize --dense`` on the dense model gives "dense int8" in the same format;
the factored checkpoint gets int8/int4 factors with RTN and GPTQ rounding (``--dense`` too,
so the block linears the recipe kept dense are quantized like the dense baseline's).

    OMP_NUM_THREADS=1 python benchmarks/bench_quant.py --factored CKPT --text wiki.test.raw

``--kernels`` instead times the CPU matmul paths of one quantized layer (the choice of
the runtime's default kernel).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench_quant")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=None, help="dense model folder (default: the sample model)")
    p.add_argument("--factored", type=Path, default=None, help="factored fp32 checkpoint (copied, never modified)")
    p.add_argument("--text", type=Path, default=None, help="WikiText-2 test text (evaluation only)")
    p.add_argument("--work", type=Path, default=None, help="where variants and exports go (default: factorlm cache)")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--ppl-window", type=int, default=1024)
    p.add_argument("--zeroshot-limit", type=int, default=0,
                   help="rows per zero-shot task (piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq); 0: skip")
    p.add_argument("--ppl-fastest", action="store_true",
                   help="also score quantized variants with their layers on the 'fastest' kernel (bf16 activations)")
    p.add_argument("--calib", default="sample", help="GPTQ calibration text: 'sample' (built-in) or a file")
    p.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration windows")
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ Grams from one pass of the unquantized model (default: block by block, sequential)")
    p.add_argument("--lm-head", action="store_true", help="quantize the LM head too in every quantized variant")
    p.add_argument("--embeddings", action="store_true",
                   help="int8 input embeddings too in every quantized variant (needs --lm-head on a tied model)")
    p.add_argument("--int4-group", type=int, default=32)
    p.add_argument("--variants", default="dense-fp32,dense-int8,fact-fp32,fact-int8-rtn,fact-int8-gptq,"
                                          "fact-int4-rtn,fact-int4-gptq")
    p.add_argument("--point", action="append", default=[], metavar="NAME=DIR[:BITS[:GROUP[:ROUNDING]]]",
                   help="an extra variant: checkpoint DIR as is, or quantized here (with --dense); e.g. "
                        "k0.9-int8=CKPT:8 for the equal-bytes comparison")
    p.add_argument("--engines", default="torch,torch-fastest,onnx,onnx-a4",
                   help="torch (default exact kernel), torch-fastest (quantized layers on the 'fastest' kernel: "
                        "bf16 activations), onnx (MatMulNBits accuracy_level 0: fp32 compute), onnx-a4 (level 4: "
                        "int8 activations)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="quant", help="results/<name>.{md,json}")
    p.add_argument("--kernels", action="store_true", help="time the CPU matmul paths instead")
    p.add_argument("--no-quality", action="store_true", help="speed only (e.g. a second run on other engines)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- variants

def build_point(spec: str, args: argparse.Namespace, work: Path) -> tuple[str, Path]:
    """``NAME=DIR[:BITS[:GROUP[:ROUNDING]]]`` -> (name, folder): DIR itself, or DIR quantized into ``work``."""
    from factorlm.compressor.quantize import quantize_checkpoint

    name, _, rest = spec.partition("=")
    src, *opts = rest.split(":")
    if not opts:
        return name, Path(src)
    out = work / name
    if not (out / "config.json").is_file():
        bits = int(opts[0])
        group = int(opts[1]) if len(opts) > 1 and opts[1] else None
        rounding = opts[2] if len(opts) > 2 else "rtn"
        quantize_checkpoint(Path(src), out, bits=bits, group_size=group if bits == 4 else None, rounding=rounding,
                            **quant_kwargs(args))
    return name, out


def quant_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The quantize_checkpoint arguments every variant shares (calibration, Gram pass, LM head)."""
    from factorlm.runtime.quant import QuantOptions

    return {"dense": True, "calib": args.calib, "calib_samples": args.calib_samples, "calib_len": args.calib_len,
            "options": QuantOptions(sequential=not args.one_pass), "lm_head": args.lm_head,
            "embeddings": args.embeddings}


def build_variant(name: str, args: argparse.Namespace, work: Path) -> Path:
    """The folder of variant ``name``, quantized here on first use (cached by name in ``work``)."""
    from factorlm.compressor.quantize import quantize_checkpoint

    if name == "dense-fp32":
        return args.dense
    if name == "fact-fp32":
        out = work / "fact-fp32"
        if not (out / "config.json").is_file():
            shutil.copytree(args.factored, out, dirs_exist_ok=True)
        return out
    out = work / name
    if (out / "config.json").is_file():
        return out
    kind, bits, rounding = (name.split("-") + ["rtn"])[:3]
    src = args.dense if kind == "dense" else build_variant("fact-fp32", args, work)
    b = int(bits.removeprefix("int"))
    t0 = time.perf_counter()
    quantize_checkpoint(src, out, bits=b, group_size=args.int4_group if b == 4 else None, rounding=rounding,
                        **quant_kwargs(args))
    log.info("built %s in %.0f s", name, time.perf_counter() - t0)
    return out


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def quality(path: Path, tokenizer_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from factorlm.eval.perplexity import perplexity, read_text
    from factorlm.runtime.checkpoint import load_model, load_tokenizer

    from factorlm.runtime.quant_linear import prepare_quantized

    torch.set_num_threads(1)
    model = load_model(path)
    tokenizer, text = load_tokenizer(tokenizer_dir), read_text(args.text)
    t0 = time.perf_counter()
    r = perplexity(model, tokenizer, text, window=args.ppl_window, max_tokens=args.ppl_tokens, progress=False)
    out = {"ppl": r.ppl, "ppl_tokens_scored": r.tokens_scored, "ppl_s": time.perf_counter() - t0}
    if args.zeroshot_limit > 0:
        from factorlm.bench.pareto_run import ZEROSHOT_TASKS
        from factorlm.eval.zeroshot import evaluate_zeroshot

        t0 = time.perf_counter()
        zs = evaluate_zeroshot(model, tokenizer, list(ZEROSHOT_TASKS), limit=args.zeroshot_limit, progress=False)
        out.update({"zeroshot_average": zs["average"], "zeroshot_s": time.perf_counter() - t0})
    if args.ppl_fastest and prepare_quantized(model, "fastest"):
        out["ppl_fastest"] = perplexity(model, tokenizer, text, window=args.ppl_window, max_tokens=args.ppl_tokens,
                                        progress=False).ppl
    return out


def onnx_dir(name: str, path: Path, work: Path, engine: str = "onnx") -> Path:
    """The validated export (accuracy_level 0); ``onnx-a4`` is a copy with MatMulNBits accuracy_level 4."""
    from factorlm.exporters.onnx import export_onnx

    out = work / f"{name}-onnx"
    if not (out / "factorlm_onnx.json").is_file():
        t0 = time.perf_counter()
        export_onnx(path, out, overwrite=True, threads=1)
        log.info("exported %s in %.0f s", name, time.perf_counter() - t0)
    if engine == "onnx":
        return out
    import onnx

    a4 = work / f"{name}-onnx-a4"
    if not (a4 / "factorlm_onnx.json").is_file():
        shutil.copytree(out, a4, dirs_exist_ok=True)
        graph = onnx.load(str(a4 / "model.onnx"))
        for node in graph.graph.node:
            for attr in node.attribute:
                if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                    attr.i = 4
        onnx.save(graph, str(a4 / "model.onnx"))
    return a4


def speed(engine: str, paths: dict[str, Path], work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{variant: {"b1": tok/s, ...}} for one engine, interleaved across variants, best of the repeats."""
    from factorlm.bench.engines import OnnxRunner, TorchRunner
    from factorlm.bench.runner import BenchConfig
    from factorlm.runtime.format import FactorlmError

    cfg = BenchConfig(engines=["torch" if engine.startswith("torch") else "onnx"], batches=[int(b) for b in args.batches.split(",")],
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
    runners: dict[str, Any] = {}
    out: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        try:
            if engine.startswith("torch"):
                from factorlm.runtime.quant_linear import prepare_quantized

                runners[name] = TorchRunner(path, cfg)
                if engine == "torch-fastest":
                    prepare_quantized(runners[name].model, "fastest")
            else:
                runners[name] = OnnxRunner(onnx_dir(name, path, work, engine), cfg)
        except FactorlmError as exc:  # e.g. an int4 group size ONNX Runtime's kernel cannot take
            log.warning("%s on %s: %s", name, engine, exc)
            out[name] = {"error": str(exc)}
    prompt = [[(7 * i + 11) % 1000 + 100 for i in range(args.prompt_tokens)]]
    for batch in cfg.batches:
        for runner in runners.values():  # warm-up
            runner.run(prompt * batch, 4)
        for _ in range(args.repeats):
            for name, runner in runners.items():
                t = runner.run(prompt * batch, args.new_tokens)
                tok_s = batch * (args.new_tokens - 1) / t.decode_s
                cell = out.setdefault(name, {})
                cell[f"b{batch}"] = max(cell.get(f"b{batch}", 0.0), tok_s)
    for runner in runners.values():
        runner.close()
    return out


# --------------------------------------------------------------------------- report

def write_report(result: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["variants"]
    ref = rows.get("fact-fp32", {}).get("ppl")
    engines = [e for e in result["config"]["engines"].split(",") if e]
    batches = result["config"]["batches"].split(",")
    cols = [f"{e} b{b}" for e in engines for b in batches]
    with_fastest = any("ppl_fastest" in r for r in rows.values())
    head = ["variant", "bytes (MB)", "WikiText-2 ppl", "ppl vs fact-fp32", "zero-shot avg"]
    head += ["ppl, fastest kernel"] * with_fastest + cols
    lines = [f"# Quantized factors on the sample model ({result['config']['factored_name']} ranks)", "",
             f"Command: `{result['command']}`", "",
             f"Load average at start / end: {result['load_start']} / {result.get('load_end', 'n/a')}; "
             f"1 thread; WikiText-2 test, first {result['config']['ppl_tokens']} tokens, window "
             f"{result['config']['ppl_window']}; decode tok/s = batch x {result['config']['new_tokens'] - 1} "
             f"tokens / decode time, best of {result['config']['repeats']} interleaved repeats. int4 group size "
             f"{result['config']['int4_group']}. GPTQ Grams from {result['config']['calib_samples']} x "
             f"{result['config']['calib_len']} tokens of {calib_name(result['config'].get('calib', 'sample'))}, "
             f"{'one pass of the unquantized model' if result['config'].get('one_pass') else 'block by block'}"
             f"{'; LM head quantized too' if result['config'].get('lm_head') else ''}"
             f"{'; input embeddings int8 too' if result['config'].get('embeddings') else ''}."
             + (f" Zero-shot: average accuracy over 6 tasks (piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
                f"boolq), {result['config']['zeroshot_limit']} rows each." if result['config'].get('zeroshot_limit')
                else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, r in rows.items():
        ppl = r.get("ppl")
        row = [v, f"{r.get('bytes', 0) / 1e6:.1f}", f"{ppl:.3f}" if ppl else "",
               f"{(ppl / ref - 1) * 100:+.2f}%" if ppl and ref else "",
               f"{r['zeroshot_average']:.4f}" if r.get("zeroshot_average") is not None else ""]
        if with_fastest:
            pf = r.get("ppl_fastest")
            row.append(f"{pf:.3f} ({(pf / ref - 1) * 100:+.2f}%)" if pf and ref else "")
        for e in engines:
            for b in batches:
                s = r.get("speed", {}).get(e, {})
                row.append(f"{s[f'b{b}']:.1f}" if f"b{b}" in s else ("n/a" if "error" in s else ""))
        lines.append("| " + " | ".join(row) + " |")
    errors = [f"- {v} on {e}: {s['error']}" for v, r in rows.items() for e, s in r.get("speed", {}).items()
              if "error" in s]
    if errors:
        lines += ["", "Not measured:", *errors]
    if result.get("notes"):
        lines += ["", *result["notes"]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def calib_name(calib: str) -> str:
    return "the built-in sample text" if calib == "sample" else Path(calib).name


KERNEL_SHAPES = ((1536, 576, 384), (576, 1536, 384), (576, 576, 256), (192, 576, 128))  # (out, in, rank)


def time_kernels(repeats: int = 5, calls: int = 100) -> dict[str, Any]:
    """us per call (median of ``repeats``) of one factored layer through each registered kernel, 1 thread.

    References: the fp32 FactoredLinear ("fp32") and the same factors in bf16 with bf16
    activations ("fp-bf16"); int8 per channel and int4 group 32 codes, batch 1 and 8.
    """
    import statistics

    import torch

    from factorlm.runtime.factored_linear import FactoredLinear
    from factorlm.runtime.quant_kernels import KERNELS
    from factorlm.runtime.quant_linear import QuantizedFactoredLinear

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, Any] = {"load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    for o, i, r in KERNEL_SHAPES:
        fp = FactoredLinear.from_linear(torch.nn.Linear(i, o, bias=False), r)
        bf = FactoredLinear.from_linear(torch.nn.Linear(i, o, bias=False), r).to(torch.bfloat16)
        quant = {8: QuantizedFactoredLinear.from_factored(fp, 8), 4: QuantizedFactoredLinear.from_factored(fp, 4, 32)}
        for b in (1, 8):
            x = torch.randn(b, i)
            cases: dict[str, Any] = {"fp32": (fp, x), "fp-bf16": (bf, x.to(torch.bfloat16))}
            for bits, q in quant.items():
                for name, kernel in KERNELS.items():
                    if not (kernel.unsupported(q.part_info("weight_u")) or kernel.unsupported(q.part_info("weight_v"))):
                        cases[f"int{bits}/{name}"] = (bits, name)
            row = {}
            for _ in range(repeats):  # interleaved: every case once per repeat
                for case, spec in cases.items():
                    if isinstance(spec[0], int):
                        layer, inp = quant[spec[0]], x
                        layer.prepare(spec[1])
                    else:
                        layer, inp = spec
                    with torch.inference_mode():
                        for _ in range(5):
                            layer(inp)
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            layer(inp)
                    row.setdefault(case, []).append((time.perf_counter() - t0) / calls * 1e6)
            out[f"{o}x{i} r{r} b{b}"] = {k: round(statistics.median(v), 2) for k, v in row.items()}
            log.info("%dx%d r%d b%d: %s", o, i, r, b, out[f"{o}x{i} r{r} b{b}"])
    out["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return out


def _portable(arg: str) -> str:
    """A path argument as its last two components (results name no machine paths)."""
    if "=" in arg and os.sep in arg:  # --point NAME=DIR[:...]
        name, _, rest = arg.partition("=")
        src, *opts = rest.split(":")
        return ":".join([f"{name}={_portable(src)}", *opts])
    return "/".join(Path(arg).parts[-2:]) if os.sep in arg and Path(arg).exists() else arg


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.kernels:
        timing = time_kernels()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quant_kernels.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(json.dumps(timing, indent=2))
        return 0
    from factorlm.sample_model import cache_root, sample_model_path

    args.dense = args.dense or sample_model_path()
    args.factored = args.factored or cache_root() / "pareto" / "ckpt" / "saes-mgaa-k0.8"
    args.text = args.text or Path("wikitext-2-raw/wiki.test.raw")
    work = args.work or cache_root() / "bench-quant"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_quant.py " + " ".join(map(_portable, argv)),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("dense", "factored", "text", "work", "point", "calib")}
        | {"calib": args.calib if args.calib == "sample" else Path(args.calib).name}
        | {"factored_name": args.factored.name, "points": [p.split("=")[0] for p in args.point]},
        "variants": {},
        "notes": [],
    }
    names = [n for n in args.variants.split(",") if n]
    paths = {}
    for name in names:
        paths[name] = build_variant(name, args, work)
    for spec in args.point:
        name, path = build_point(spec, args, work)
        names.append(name)
        paths[name] = path
    for name in names:
        row = result["variants"].setdefault(name, {})
        row["bytes"] = stored_bytes(paths[name])
        if args.no_quality:
            continue
        row.update(quality(paths[name], args.dense, args))
        log.info("%s: %.1f MB, ppl %.3f", name, row["bytes"] / 1e6, row["ppl"])
        write_report(result, args.name)
    for engine in [e for e in args.engines.split(",") if e]:
        for name, cells in speed(engine, paths, work, args).items():
            result["variants"][name].setdefault("speed", {})[engine] = cells
        write_report(result, args.name)
    result["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_report(result, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
