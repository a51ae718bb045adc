"""``export_onnx``: a dense or factored checkpoint -> a validated ONNX decoder folder.

Route: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the default exporter
since torch 2.9. It traces ``FactoredLinear`` as two MatMuls with no patching, gives clean
symbolic dims (batch, seq, past, past + seq) and needs far less memory than the deprecated
TorchScript tracer, which also freezes Python branches of transformers' masking code at
trace time. optimum-onnx is not an option: it pins transformers < 4.58.

The folder is built in a temporary sibling directory, validated against PyTorch, and only
then renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ...runtime.format import FactorlmError, read_factored_config
from .fuse import fuse_file
from .graph import CacheShape, FlatDecoder, dynamic_shapes, example_inputs, input_names, output_names
from .metadata import METADATA_FILE, build_metadata, genai_config, save_onnx, write_json
from .validate import validate_graph, worst_as_dict

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(18, 24)
DEFAULT_OPSET = 20
DTYPES = ("fp32", "fp16")
# MatMulNBits accuracy_level: the minimum compute precision ONNX Runtime may use for its
# activations (0 unset = fp32 on CPU, 1 fp32, 2 fp16, 3 bf16, 4 int8 per block)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EXACT_ACCURACY_LEVELS = (0, 1)
MODEL_FILE = "model.onnx"
# protobuf caps a single file at 2 GiB; above this many weight bytes write external data
EXTERNAL_DATA_BYTES = 1 << 30
# what the exporter writes besides the IO contract (which METADATA_VERSION covers): bumped when
# the graph changes (2: fused RMSNorms and shared-input MatMuls), so caches of exports can tell
GRAPH_REVISION = 2
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".data")


def check_options(out_dir: Path, opset: int, dtype: str, overwrite: bool, accuracy_level: int | None = None) -> None:
    """Reject bad options before any work, naming the problem."""
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise FactorlmError(f"unsupported accuracy level {accuracy_level!r}; MatMulNBits takes "
                            f"{', '.join(map(str, ACCURACY_LEVELS))}")
    if opset not in SUPPORTED_OPSETS:
        raise FactorlmError(f"unsupported opset {opset}: the dynamo exporter supports "
                            f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    if dtype not in DTYPES:
        raise FactorlmError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise FactorlmError(f"{out_dir}: output already exists (pass --overwrite to replace it)")


def check_request(model_dir: Path, out_dir: Path, opset: int, dtype: str, overwrite: bool,
                  accuracy_level: int | None = None) -> None:
    """Options plus the model folder itself."""
    check_options(out_dir, opset, dtype, overwrite, accuracy_level)
    if not model_dir.is_dir():
        raise FactorlmError(f"{model_dir}: checkpoint folder not found")
    if not (model_dir / "config.json").is_file():
        raise FactorlmError(f"{model_dir / 'config.json'}: missing; not a model folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load(model_dir: Path) -> torch.nn.Module:
    from ...runtime.checkpoint import load_model

    # contiguous weights: the column-major CPU layout is a runtime detail, not part of the graph
    return load_model(model_dir, fast_layout=False).float().eval()


def trace_to_onnx(model: torch.nn.Module, path: Path, opset: int, external_data: bool) -> None:
    """Export the flat decoder of ``model`` to ``path`` (and ``path.data`` with external data)."""
    shape = CacheShape.from_config(model.config)
    dtype = next(model.parameters()).dtype
    program = torch.onnx.export(
        FlatDecoder(model).eval(), example_inputs(shape, model.config.vocab_size, dtype),
        input_names=input_names(shape), output_names=output_names(shape), dynamic_shapes=dynamic_shapes(shape),
        opset_version=opset, dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=external_data)


def to_fp16(path: Path, external_data: bool) -> None:
    """Convert weights, activations and the KV cache IO to fp16 in place (ORT's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False, disable_shape_infer=True)
    save_onnx(model, path, external_data)


def quantize_int8(path: Path, external_data: bool, block_size: int = 32, accuracy_level: int = 4) -> None:
    """Weight-only int8 of every constant-weight MatMul (the factors, dense layers, LM head).

    ONNX Runtime's MatMulNBits with 8 bits and symmetric blocks of ``block_size`` along the
    inner dimension, accuracy_level 4 by default (activations quantized to int8 per block at
    run time).
    ``quantize_dynamic`` (per-tensor MatMulInteger) was tried first and rejected: on the dense
    sample model, even with the LM head left in fp32, it changed the argmax at 28 of the 64
    positions of a WikiText prompt, against 1 of 64 for this scheme.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=8, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    save_onnx(quantizer.model.model, path, external_data)


def make_session(path: Path, threads: int | None = None, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Tokenizer, chat template, config and generation config beside the graph."""
    copied = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.endswith(_SKIP_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, out_dir / f.name)
            copied.append(f.name)
    return copied


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dtype: str = "fp32", int8: bool = False, validate: bool = True, overwrite: bool = False,
                external_data: bool | None = None, threads: int | None = None,
                accuracy_level: int | None = None, fuse: bool = True) -> dict[str, Any]:
    """Export, validate and atomically write the ONNX folder; return its metadata dict.

    A quantized checkpoint (format version 2) is exported from its stored codes and scales
    (:mod:`.quant`); ``int8``/``fp16`` do not apply to it. ``accuracy_level`` is given to
    every MatMulNBits node (default: 0 for stored codes, fp32 compute and validated to fp32
    tolerance; 4 for ``int8``); levels other than 0 and 1 are validated to the int8 tolerance.
    ``fuse`` rewrites RMSNorms into one op each and joins the MatMuls that share an input
    (:mod:`.fuse`); the graph computes the same function, with fewer nodes.
    """
    from .quant import check_exportable, insert_stored, quant_metadata, stored_embeddings, stored_weights

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_request(model_dir, out_dir, opset, dtype, overwrite, accuracy_level)
    block = read_factored_config(model_dir)
    if block is not None and block.quantized and (int8 or dtype != "fp32"):
        raise FactorlmError(f"{model_dir}: checkpoint is already quantized ({block.bits}-bit); export it without "
                            f"--int8/--dtype fp16 (its stored codes are used)")
    if accuracy_level is not None and not int8 and not (block is not None and block.quantized):
        raise FactorlmError(f"{model_dir}: --accuracy-level applies to MatMulNBits nodes, which only a quantized "
                            f"checkpoint or --int8 produces")
    if accuracy_level is None:
        accuracy_level = 4 if int8 else 0
        if block is not None and block.quantized:
            log.warning("%s: exporting the stored %d-bit codes at accuracy level 0 (fp32 compute, exact); ONNX "
                        "Runtime decodes far faster at --accuracy-level 4 (int8 activations, not exact): on the "
                        "sample model 2.8 vs 59.8 tok/s for int8, 54.9 vs 82.5 for int4 (benchmarks/results/quant.md)",
                        model_dir, block.bits)
    started = time.perf_counter()
    model = _load(model_dir)
    stored, stored_emb = stored_weights(model), stored_embeddings(model)
    if stored or stored_emb:
        from ...runtime.quant_linear import dequantize_model

        check_exportable(stored)
        dequantize_model(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        path = tmp / MODEL_FILE
        log.info("exporting %s (opset %d, %s%s)", model_dir, opset, dtype, ", int8" if int8 else "")
        trace_to_onnx(model, path, opset, external_data)
        fusions = fuse_file(path, external_data, model.config, norms=True) if fuse else {}
        if dtype == "fp16":
            to_fp16(path, external_data)
        if int8:
            quantize_int8(path, external_data, accuracy_level=accuracy_level)
        n_quant, n_emb = (insert_stored(path, stored, stored_emb, external_data, accuracy_level)
                          if stored or stored_emb else (0, 0))
        if fuse:  # last: the MatMuls have their final form (fp32, fp16 or MatMulNBits)
            fusions.update(fuse_file(path, external_data, model.config, matmuls=True))
        export_s = time.perf_counter() - started
        report = None
        if validate:
            session = make_session(path, threads)
            exact = not stored or accuracy_level in EXACT_ACCURACY_LEVELS  # fp32 compute on the stored values
            worst = validate_graph(session, model, "int8" if int8 or not exact else dtype)
            report = worst_as_dict(worst)
            del session
        meta = build_metadata(model.config, dtype=dtype, int8=int8, opset=opset, source=model_dir.name,
                              ranks=block.ranks if block else None, external_data=external_data,
                              validation=report, export_s=export_s)
        meta["graph_revision"], meta["fusions"] = GRAPH_REVISION, fusions
        if stored:
            meta["quantization"] = quant_metadata(block, n_quant, accuracy_level, n_emb)
        copy_side_files(model_dir, tmp)
        write_json(tmp / METADATA_FILE, meta)
        write_json(tmp / "genai_config.json", genai_config(model.config, dtype, tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["graph_bytes"] = sum(f.stat().st_size for f in out_dir.glob(MODEL_FILE + "*"))
    log.info("wrote %s in %.1f s (%.1f MB graph)", out_dir, time.perf_counter() - started, meta["graph_bytes"] / 1e6)
    return meta
