"""``factorlm fold DIR -o OUT``: fold separately kept correctors into the factors.

A checkpoint compressed with ``--corrector-save separate`` keeps each corrector (A, B) beside
its factors so it can be trained further; the factorlm runtime folds it on load, but vLLM
and other readers expect plain factors. Folding is exact: U <- [U | B], V <- [V ; A].
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .common import check_output

CARRIED_FILES = ("factorlm_recipe.yaml", "factorlm_report.json", "factorlm_corrector_loss.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fold", help="fold separately kept correctors into the factors (exact)")
    p.add_argument("folder", help="factored checkpoint saved with --corrector-save separate")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.checkpoint import load_factored, load_tokenizer, save_factored
    from ..runtime.format import FactoredConfig, FactorlmError, read_factored_config

    src, out = Path(args.folder), Path(args.output)
    check_output(out, overwrite=args.overwrite, inputs=[src])
    block = read_factored_config(src)
    if block is None:
        raise FactorlmError(f"{src / 'config.json'}: not a factorlm checkpoint (no factorlm quantization_config)")
    if block.correctors != "separate":
        raise FactorlmError(f"{src}: correctors are {block.correctors!r}, not 'separate'; nothing to fold")
    model = load_factored(src, fast_layout=False, correctors="fold")
    extra: dict[str, str | bytes] = {name: (src / name).read_bytes() for name in CARRIED_FILES if (src / name).is_file()}
    path = save_factored(model, out, tokenizer=load_tokenizer(src), extra_files=extra, overwrite=args.overwrite,
                         config=FactoredConfig(ranks={}, dense=block.dense, producer=block.producer))
    if (src / "generation_config.json").is_file() and not (path / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", path / "generation_config.json")
    print(f"folded {len(block.corrector_ranks)} correctors; saved factored checkpoint to {path}")
    return 0
