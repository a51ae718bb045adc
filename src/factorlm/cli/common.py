"""Argument helpers shared by subcommands."""

from __future__ import annotations

from pathlib import Path

from ..runtime.format import FactorlmError

SAMPLE_ALIAS = "sample"


def resolve_model_path(value: str) -> Path:
    """A local model folder, or ``sample`` for the built-in sample model (materialised on demand).

    Hub ids are not fetched: factorlm works on local folders so runs are reproducible offline.
    """
    if value == SAMPLE_ALIAS:
        from ..sample_model import materialize_sample_model

        return materialize_sample_model()
    path = Path(value)
    if not path.exists():
        raise FactorlmError(f"{path}: model folder not found (give a local folder, or 'sample' for the built-in model)")
    if not path.is_dir():
        raise FactorlmError(f"{path}: not a folder")
    return path
