"""lm-eval's own command line, able to load factored checkpoints: ``python -m factorlm.eval.lm_eval_cli``.

``lm_eval --model hf --model_args pretrained=DIR`` alone cannot read a factored folder: the
harness never imports factorlm, so transformers does not know the ``factorlm`` quantization
method and stops with "Unknown quantization type, got factorlm". This module imports factorlm
(which registers the method), adds ``--include_path`` with factorlm's local task configs when a
run names ``--tasks`` and gives no include path of its own, and hands every argument to lm-eval's
CLI unchanged, so all of lm-eval's options work::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m factorlm.eval.lm_eval_cli \\
        --model hf --model_args pretrained=DIR,dtype=float32 --device cpu --tasks piqa,arc_easy

``python -m factorlm.eval.lm_eval_cli --print-include-path`` prints the task folder, for use
with a plain ``lm_eval`` on dense models.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def with_include_path(args: Sequence[str]) -> list[str]:
    """``args`` plus ``--include_path <factorlm task configs>`` for a run without one."""
    from .lm_eval_tasks import TASKS_DIR

    args = list(args)
    names_tasks = any(a == "--tasks" or a.startswith("--tasks=") for a in args)
    has_include = any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    if names_tasks and not has_include:
        args += ["--include_path", str(TASKS_DIR)]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's CLI with factorlm registered (exits like lm-eval does)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--print-include-path"]:
        from .lm_eval_tasks import TASKS_DIR

        print(TASKS_DIR)
        return
    import factorlm  # noqa: F401  (registers the factorlm quantization method with transformers)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise SystemExit(f"factorlm: error: lm-evaluation-harness is not installed "
                         f"(pip install 'factorlm[eval]'): {exc}") from exc
    sys.argv = ["lm-eval", *with_include_path(args)]
    cli_evaluate()


if __name__ == "__main__":
    main()
