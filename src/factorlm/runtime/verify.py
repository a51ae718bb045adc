"""Strict checks of a checkpoint's safetensors headers against its config and model skeleton.

Every reader runs the same checks before a byte of tensor data is read: ``load_factored``
and ``load_model``, the transformers quantizer (``AutoModelForCausalLM.from_pretrained``)
and ``factorlm inspect --verify``. So a missing tensor, a factor of a module that
``ranks`` does not list, a wrong shape or dtype, or a truncated file is refused with the
same message everywhere, naming the file and the module.

What a file must hold follows from the format (:mod:`.format`): every parameter and
persistent buffer of the dense skeleton, except that each module in ``ranks`` stores
``weight_u`` [out, r] and ``weight_v`` [r, in] (and, with separate correctors,
``corrector_a`` [c, in] and ``corrector_b`` [out, c]) instead of ``weight``. Tied weights
(``lm_head`` tied to the embeddings) may be absent. Only headers are read: on a
Llama-3-70B-shaped checkpoint of 8 shards, reading the headers and checking them took
about 0.07 s; importing torch and transformers and building the meta-device skeleton
cost far more (``benchmarks/bench_cli_startup.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import (
    CORRECTOR_A_SUFFIX,
    CORRECTOR_B_SUFFIX,
    U_SUFFIX,
    V_SUFFIX,
    FactoredConfig,
    FormatError,
    corrector_a_key,
    corrector_b_key,
    qweight_key,
    scales_key,
    u_key,
    v_key,
)
from .safetensors_header import TensorHeader, read_header

FACTOR_SUFFIXES = (U_SUFFIX, V_SUFFIX, CORRECTOR_A_SUFFIX, CORRECTOR_B_SUFFIX)
CORRECTOR_SUFFIXES = (CORRECTOR_A_SUFFIX, CORRECTOR_B_SUFFIX)
@dataclass(frozen=True)
class Expected:
    """A tensor the checkpoint must hold: its shape, whether it is floating point, whether it is a factor."""

    shape: tuple[int, ...]
    floating: bool
    factor: bool = False
    dtype: str | None = None  # an exact dtype (quantized codes: int8 / uint8)


def index_problems(root: Path, headers: dict[str, TensorHeader]) -> list[str]:
    """A sharded folder's index must name the file each tensor is in, and every tensor."""
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{index}: malformed safetensors index: {exc}"]
    problems = []
    for name, shard in sorted(weight_map.items()):
        info = headers.get(name)
        if info is None:
            problems.append(f"{index}: lists tensor {name!r} in {shard}, which does not hold it")
        elif info.file.name != shard:
            problems.append(f"{index}: lists tensor {name!r} in {shard}, but it is stored in {info.file.name}")
    problems += [f"{headers[n].file}: tensor {n!r} is not listed in {index.name}"
                 for n in sorted(set(headers) - set(weight_map))]
    return problems


# --------------------------------------------------------------------------- expectations


def rank_problem(model: Any, fqn: str, rank: int) -> str | None:
    """Why module ``fqn`` of ``model`` cannot hold factors of ``rank`` (None when it can)."""
    from torch import nn

    from .factored_linear import FactoredLinear

    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        return f"module {fqn!r} listed in 'ranks' does not exist in {type(model).__name__}"
    if isinstance(module, FactoredLinear):
        return None
    if not isinstance(module, nn.Linear):
        return f"module {fqn!r} is a {type(module).__name__}, not a Linear; it cannot be factored"
    limit = min(module.in_features, module.out_features)
    if rank > limit:
        return f"module {fqn!r}: rank {rank} exceeds min(in, out) = {limit}"
    return None


def tied_names(model: Any) -> dict[str, str]:
    """Parameters that share another's storage and so may be absent from a file (name -> source)."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if getattr(model.config, "tie_word_embeddings", False):
        tied.setdefault("lm_head.weight", "model.embed_tokens.weight")
    return tied


def expected_tensors(model: Any, block: FactoredConfig, where: str) -> tuple[dict[str, Expected], list[str], set[str]]:
    """The tensors a checkpoint of ``model`` (a dense skeleton) with ``block`` must hold.

    Returns (expected, problems with the block itself, modules whose block entry is wrong).
    """
    from torch import nn

    expected = {k: Expected(tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict(keep_vars=True).items()}
    problems: list[str] = []
    bad: set[str] = set()
    tied = tied_names(model)
    for fqn, rank in block.ranks.items():
        problem = rank_problem(model, fqn, rank)
        if problem is None and f"{fqn}.weight" in tied:
            problem = (f"module {fqn!r} is listed in 'ranks' but its weight is tied to "
                       f"{tied[f'{fqn}.weight']!r}; a tied weight cannot be factored")
        if problem:
            problems.append(f"{where}: {problem}")
            bad.add(fqn)
            continue
        module = model.get_submodule(fqn)
        out_f, in_f = module.out_features, module.in_features
        expected.pop(f"{fqn}.weight", None)
        expected[u_key(fqn)] = Expected((out_f, rank), True, factor=True)
        expected[v_key(fqn)] = Expected((rank, in_f), True, factor=True)
        if fqn in block.corrector_ranks:
            c = block.corrector_ranks[fqn]
            expected[corrector_a_key(fqn)] = Expected((c, in_f), True, factor=True)
            expected[corrector_b_key(fqn)] = Expected((out_f, c), True, factor=True)
        if block.quantized:
            problems += _expect_quantized(expected, block, fqn, "weight_u", out_f, rank, where)
            problems += _expect_quantized(expected, block, fqn, "weight_v", rank, in_f, where)
    for fqn in block.quantized_dense:
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            problems.append(f"{where}: module {fqn!r} listed in 'quantized_dense' does not exist in "
                            f"{type(model).__name__}")
            bad.add(fqn)
            continue
        if not isinstance(module, nn.Linear) or f"{fqn}.weight" in tied:
            problems.append(f"{where}: module {fqn!r} listed in 'quantized_dense' is not an untied Linear")
            bad.add(fqn)
            continue
        expected.pop(f"{fqn}.weight", None)
        problems += _expect_quantized(expected, block, fqn, "weight", module.out_features, module.in_features, where)
    problems += _expect_embeddings(model, block, expected, bad, tied, where)
    for fqn in block.dense:
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            problems.append(f"{where}: module {fqn!r} listed in 'dense' does not exist in {type(model).__name__}")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"{where}: module {fqn!r} listed in 'dense' is a {type(module).__name__}, not a Linear")
    return expected, problems, bad


def _expect_embeddings(model: Any, block: FactoredConfig, expected: dict[str, Expected], bad: set[str],
                       tied: dict[str, str], where: str) -> list[str]:
    """int8 rows + per-row scales in place of each listed embedding's table (format version 3)."""
    from torch import nn

    problems = []
    for fqn in block.quantized_embeddings:
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Embedding):
            what = "does not exist" if module is None else f"is a {type(module).__name__}, not an embedding"
            problems.append(f"{where}: module {fqn!r} listed in 'quantized_embeddings' {what} in {type(model).__name__}")
            bad.add(fqn)
            continue
        if f"{fqn}.weight" in tied.values() or f"{fqn}.weight" in tied:
            problems.append(f"{where}: module {fqn!r} listed in 'quantized_embeddings' is tied to the LM head "
                            f"(tie_word_embeddings); only an untied embedding can be quantized")
            bad.add(fqn)
            continue
        expected.pop(f"{fqn}.weight", None)
        expected[qweight_key(fqn, "weight")] = Expected((module.num_embeddings, module.embedding_dim), False,
                                                        dtype="int8")
        expected[scales_key(fqn, "weight")] = Expected((module.num_embeddings,), True)
    return problems


def _expect_quantized(expected: dict[str, Expected], block: FactoredConfig, fqn: str, part: str,
                      out_f: int, in_f: int, where: str) -> list[str]:
    """Replace the fp expectation of ``fqn.part`` by its codes and scales (format version 2)."""
    from .quant import check_quant_params, qweight_shape, scales_shape

    expected.pop(f"{fqn}.{part}", None)
    try:
        check_quant_params(int(block.bits or 0), block.group_size, in_f, f"module {fqn!r} ({part})")
    except FormatError as exc:
        return [f"{where}: {exc}"]
    except Exception as exc:  # FactorlmError from the math module: same message, one type for readers
        return [f"{where}: {exc}"]
    bits = int(block.bits or 0)
    expected[qweight_key(fqn, part)] = Expected(qweight_shape(bits, out_f, in_f), False,
                                                dtype="int8" if bits == 8 else "uint8")
    expected[scales_key(fqn, part)] = Expected(scales_shape(bits, block.group_size, out_f, in_f), True)
    return []


def checkpoint_problems(model: Any, headers: dict[str, TensorHeader], block: FactoredConfig | None,
                        where: str | os.PathLike) -> list[str]:
    """Every way the tensors in ``headers`` contradict ``block`` and the dense skeleton ``model``.

    ``where`` (the checkpoint folder) prefixes problems that are not about one file; the
    others name the file. An empty list means the checkpoint is consistent. Factors of a
    module that ``ranks`` does not list come first: they explain that module's missing weight.
    """
    where = str(where)
    block = block or FactoredConfig(ranks={})
    expected, problems, bad = expected_tensors(model, block, str(Path(where) / "config.json"))
    stored_dense = [m for m in block.ranks if m not in bad and f"{m}.weight" in headers
                    and u_key(m) not in headers and v_key(m) not in headers]
    problems += [f"{where}: module {m!r} is listed in 'ranks' but the checkpoint stores it dense ({m}.weight), "
                 f"not as factors" for m in stored_dense]
    bad |= set(stored_dense)
    stray, unexpected = _unexpected_problems(model, headers, expected, block, bad)
    tied = tied_names(model)
    for name, exp in expected.items():
        module = name.rpartition(".")[0]
        if module in bad or module in stray:
            continue
        info = headers.get(name)
        if info is None:
            if name not in tied:
                problems.append(f"{where}: missing tensor {name!r} for module {module!r}")
            continue
        problems += _tensor_problems(info, exp, block)
    return list(stray.values()) + problems + unexpected


def _unexpected_problems(model: Any, headers: dict[str, TensorHeader], expected: dict[str, Expected],
                         block: FactoredConfig, bad: set[str]) -> tuple[dict[str, str], list[str]]:
    """Tensors the checkpoint should not hold: ({module: problem} for factors of unlisted modules, others)."""
    stray: dict[str, str] = {}
    others: list[str] = []
    for name in sorted(set(headers) - set(expected)):
        module, _, suffix = name.rpartition(".")
        file = headers[name].file
        if module in bad or module in stray:
            continue
        if suffix in FACTOR_SUFFIXES and module not in block.ranks:
            stray[module] = (f"{file}: tensor {name!r} is a factor of module {module!r}, which 'ranks' in "
                             f"config.json does not list")
        elif suffix == "weight" and module in block.ranks:
            others.append(f"{file}: tensor {name!r} is the dense weight of module {module!r}, which 'ranks' in "
                          f"config.json lists as factored")
        elif suffix == "weight" and module in block.quantized_dense:
            others.append(f"{file}: tensor {name!r} is the unquantized weight of module {module!r}, which "
                          f"'quantized_dense' in config.json lists as quantized")
        elif suffix == "weight" and module in block.quantized_embeddings:
            others.append(f"{file}: tensor {name!r} is the unquantized table of module {module!r}, which "
                          f"'quantized_embeddings' in config.json lists as quantized")
        elif suffix in CORRECTOR_SUFFIXES:
            others.append(f"{file}: tensor {name!r} is a corrector of module {module!r}, which 'corrector_ranks' "
                          f"in config.json does not list")
        else:
            others.append(f"{file}: unexpected tensor {name!r} (no such parameter in {type(model).__name__})")
    return stray, others


def _tensor_problems(info: TensorHeader, exp: Expected, block: FactoredConfig) -> list[str]:
    if info.shape != exp.shape:
        return [f"{info.file}: tensor {info.name!r} has shape {info.shape}, module expects {exp.shape}"]
    if exp.dtype is not None and info.dtype != exp.dtype:
        return [f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, expected {exp.dtype} (quantized codes)"]
    if exp.floating and not info.is_floating:
        return [f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, expected a floating-point dtype"]
    if exp.factor and info.dtype != block.factor_dtype:
        return [f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, but config.json says "
                f"factor_dtype {block.factor_dtype!r}"]
    return []


def raise_on_problems(problems: Sequence[str], where: str | os.PathLike) -> None:
    """Raise the first problem as a :class:`FormatError`, saying how many more there are."""
    if not problems:
        return
    more = len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''}; 'factorlm inspect --verify {where}' lists them)"
    raise FormatError(problems[0] + (suffix if more else ""))


# --------------------------------------------------------------------------- whole folder


def meta_skeleton(root: Path) -> Any:
    """The dense model of ``root``'s config.json with every tensor on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def verify_folder(root: str | os.PathLike, files: Sequence[Path]) -> tuple[list[str], dict[str, Any]]:
    """All problems of the checkpoint in ``root`` (dense or factored) and a summary of what was read.

    ``files`` are its safetensors files (``checkpoint.safetensors_files``). Each file's
    problems are collected; nothing stops at the first.
    """
    from .format import read_factored_config

    root = Path(root)
    problems: list[str] = []
    headers: dict[str, TensorHeader] = {}
    for file in files:
        try:
            for name, info in read_header(file).items():
                if name in headers:
                    problems.append(f"{info.file}: tensor {name!r} is also stored in {headers[name].file}")
                headers.setdefault(name, info)
        except FormatError as exc:
            problems.append(str(exc))
    unreadable = len(problems)
    problems += index_problems(root, headers)
    try:
        block = read_factored_config(root)
        model = meta_skeleton(root)
    except FormatError as exc:
        return problems + [str(exc)], {}
    except (ValueError, KeyError, OSError) as exc:
        return problems + [f"{root / 'config.json'}: cannot build the model it describes: {exc}"], {}
    if unreadable:  # its tensors would all read as missing: the unreadable file is the problem to fix
        problems.append(f"{root}: tensors not checked against config.json until every file reads")
    else:
        problems += checkpoint_problems(model, headers, block, root)
    summary = {"files": len(files), "tensors": len(headers), "factored": len(block.ranks) if block else 0,
               "dense_listed": len(block.dense) if block else 0,
               "correctors": len(block.corrector_ranks) if block else 0,
               "architecture": type(model).__name__}
    return problems, summary
