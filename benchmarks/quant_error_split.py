"""Which factor carries the int4 error? Quantize only V, only U, or both, in memory, and score perplexity.

For every factored layer of a checkpoint: GPTQ (act-order, the default clipping search) with
input Grams from one pass of the unquantized model over the calibration text; U is refit to
the quantized V when V is quantized (as ``factorlm quantize`` does). Perplexity on the first
``--tokens`` tokens of the evaluation text (window 1024). Nothing is written but the result.

``--transform`` first rewrites every layer's factors into another pair with the same product
(no runtime cost): ``orth`` U Q and Q^T V for a random orthogonal Q of the rank dimension
(spreads each rank channel's energy over all of them, as incoherence processing does);
``balance`` scales rank channel j of U and V so that U's column and V's row have one norm.

    OMP_NUM_THREADS=1 python benchmarks/quant_error_split.py CKPT --calib CALIB.txt --text wiki.test.raw
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("quant_error_split")


def quantize_parts(model: torch.nn.Module, names: list[str], grams: dict[str, torch.Tensor], parts: str,
                   bits: int, group: int | None, damp: float) -> None:
    """Replace U and/or V of every named FactoredLinear by its GPTQ-quantized values (in place)."""
    from factorlm.runtime import quant as Q

    for name in names:
        layer = model.get_submodule(name)
        u, v, gram = layer.weight_u.detach().float(), layer.weight_v.detach().float(), grams[name]
        vq = Q.dequantize(*Q.quantize_gptq(v, gram, bits, group, damp=damp), bits, group) if "v" in parts else v
        uu = Q.refit_u(u, v, vq, gram) if "v" in parts else u
        if "u" in parts:
            gram_u = vq.double() @ gram.double() @ vq.double().T
            uu = Q.dequantize(*Q.quantize_gptq(uu, gram_u, bits, group, damp=damp), bits, group)
        with torch.no_grad():
            layer.weight_u.copy_(uu)
            layer.weight_v.copy_(vq)


def transform_factors(model: torch.nn.Module, names: list[str], kind: str, seed: int = 0) -> None:
    """Replace (U, V) of every named layer by an equivalent pair: U Q, Q^T V (``orth``) or U D, D^-1 V (``balance``)."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        layer = model.get_submodule(name)
        u, v = layer.weight_u.detach().double(), layer.weight_v.detach().double()
        if kind == "orth":
            q, r = torch.linalg.qr(torch.randn(u.shape[1], u.shape[1], generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))
            u, v = u @ q, q.T @ v
        elif kind == "balance":
            d = (v.norm(dim=1) / u.norm(dim=0).clamp_min(1e-30)).sqrt()
            u, v = u * d, v / d[:, None]
        with torch.no_grad():
            layer.weight_u.copy_(u.float())
            layer.weight_v.copy_(v.float())


def main(argv: list[str]) -> int:
    from factorlm.compressor.calib_sources import calibration_windows
    from factorlm.compressor.quantize import collect_grams
    from factorlm.eval.perplexity import perplexity, read_text
    from factorlm.runtime.checkpoint import load_model, load_tokenizer
    from factorlm.runtime.factored_linear import FactoredLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--calib", required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--transform", choices=("none", "orth", "balance"), default="none",
                   help="rewrite the factors into an equivalent pair before quantizing (see the docstring)")
    p.add_argument("--name", default="quant_error_split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    model = load_model(args.checkpoint, fast_layout=False).float().eval()
    tok = load_tokenizer(args.checkpoint)
    text = read_text(args.text)
    names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    if args.transform != "none":
        transform_factors(model, names, args.transform)
    grams = collect_grams(model, names, calibration_windows(tok, args.calib, 32, 512, 0))

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, window=1024, max_tokens=args.tokens, progress=False).ppl

    group = args.group if args.bits == 4 else None
    rows = {"fp32": ppl(model)}
    cases = [("V only", "v", group, 0.01), ("U only", "u", group, 0.01), ("both", "uv", group, 0.01)]
    if args.bits == 4 and args.transform == "none":
        cases += [("both, group 16", "uv", 16, 0.01), ("both, damping 1e-3", "uv", group, 1e-3),
                  ("both, damping 0.1", "uv", group, 0.1)]
    for label, parts, g, damp in cases:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_parts(m, names, grams, parts, args.bits, g, damp)
        rows[label] = ppl(m)
        log.info("%s: ppl %.3f (%.0f s)", label, rows[label], time.perf_counter() - t0)
    command = (f"OMP_NUM_THREADS=1 python benchmarks/quant_error_split.py {args.checkpoint.name} --calib "
               f"{Path(args.calib).name} --text {args.text.name} --tokens {args.tokens} --bits {args.bits} "
               f"--group {args.group}" + (f" --transform {args.transform}" if args.transform != "none" else ""))
    result = {"command": command, "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
              "checkpoint": args.checkpoint.name, "bits": args.bits, "group": args.group, "tokens": args.tokens,
              "transform": args.transform,
              "ppl": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
