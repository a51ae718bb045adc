"""What a larger-than-RAM compression keeps on disk so that a killed run can resume.

The output is built in the one temporary folder of the save (``.<out>.factorlm-partial``).
Beside the finished blocks (``blocks/block-00012.safetensors``, written by
:mod:`.shard_writer`) it holds:

* ``factorlm_resume.json``: the run's key (recipe, a fingerprint of the source, output
  dtype), the rank plan and allocation report, the finished block indices, their report rows
  and timings;
* ``factorlm_streams.safetensors``: the calibration activations after the last finished block
  (student stream and, for teacher-stream methods, the teacher stream), which the next block
  needs.

Each file is replaced atomically after a block is done, streams and blocks before the json
that names them, so whatever moment the run dies at, the json describes a consistent state.
A resume with a different recipe, source or dtype is refused with the field that differs.

While the output shards are packed (:func:`.shard_writer.write_shards`), each block file is
deleted as soon as all its tensors are in a shard, so the folder never holds the checkpoint twice (peak disk:
the output plus about one block). The json then records the packing progress: the shard size
of the plan, how many tensors (in output order) are durably written (flushed and fsynced) and
which blocks are packed (their files may be gone). A run killed while packing resumes there:
the partly written shard is cut back to the recorded tensor and packing continues; the
calibration streams, no longer needed, are removed when packing starts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..runtime.format import FactorlmError
from .shard_writer import write_block_file

STATE_FILE = "factorlm_resume.json"
STREAMS_FILE = "factorlm_streams.safetensors"
BLOCKS_DIR = "blocks"
STATE_VERSION = 1


@dataclass
class ResumeState:
    """The on-disk progress of one compression (see the module docstring)."""

    folder: Path
    key: dict[str, Any]
    finished: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, int | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    packing: dict[str, Any] | None = None  # {"max_shard_bytes", "packed", "packed_blocks"} once packing started

    # ---------------------------------------------------------------- creation

    @classmethod
    def fresh(cls, folder: Path, key: dict[str, Any]) -> ResumeState:
        """A new, empty state (an older folder of the same output is removed first)."""
        shutil.rmtree(folder, ignore_errors=True)
        (folder / BLOCKS_DIR).mkdir(parents=True)
        state = cls(folder, json.loads(json.dumps(key)))
        state._write_json()
        return state

    @classmethod
    def open(cls, folder: Path, key: dict[str, Any], max_shard_bytes: int | None = None) -> ResumeState:
        """The state a killed run left in ``folder``; refused when its key differs from ``key``.

        A run killed while packing must be resumed with the same shard size once block files are
        gone (``max_shard_bytes``); before that, packing simply starts over with the new size.
        """
        path = folder / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FactorlmError(f"{path}: cannot read the resume state ({exc}); run without --resume") from None
        old = data.get("key", {})
        key = json.loads(json.dumps(key))  # compare as stored (tuples become lists)
        for name in sorted(set(old) | set(key)):
            if old.get(name) != key.get(name):
                raise FactorlmError(f"{path}: cannot resume, {name} differs from the interrupted run "
                                    f"({old.get(name)!r} there, {key.get(name)!r} now); run without --resume "
                                    "to start over")
        state = cls(folder, key, [int(i) for i in data["finished"]], list(data["rows"]), data.get("plan"),
                    dict(data.get("info", {})), data.get("packing"))
        packing = state.packing
        if packing is not None and max_shard_bytes is not None and packing["max_shard_bytes"] != max_shard_bytes:
            if packing["packed_blocks"]:
                raise FactorlmError(f"{path}: cannot resume, the interrupted run was packing shards of at most "
                                    f"{packing['max_shard_bytes']} bytes and has removed packed block files; pass "
                                    f"--max-shard-size {packing['max_shard_bytes']}")
            state.packing = None  # nothing removed yet: pack again with the new size
        packed = set(state.packing["packed_blocks"]) if state.packing else set()
        for index in state.finished:
            if index not in packed and not state.block_path(index).is_file():
                raise FactorlmError(f"{state.block_path(index)}: finished block file is missing; run without --resume")
        return state

    # ---------------------------------------------------------------- progress

    @property
    def start(self) -> int:
        """The first block still to do (finished blocks are always a prefix)."""
        return len(self.finished)

    def block_path(self, index: int) -> Path:
        return self.folder / BLOCKS_DIR / f"block-{index:05d}.safetensors"

    def set_plan(self, plan: dict[str, int | None], info: dict[str, Any]) -> None:
        self.plan, self.info = dict(plan), dict(info)
        self._write_json()

    def block_done(self, index: int, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]],
                   student: list[torch.Tensor], teacher: list[torch.Tensor] | None, seconds: float) -> None:
        """Record finished block ``index``: its tensors, the streams after it, then the json."""
        if index != self.start:
            raise FactorlmError(f"block {index} finished out of order (expected block {self.start})")
        write_block_file(self.block_path(index), tensors)
        streams = {f"student.{i}": t for i, t in enumerate(student)}
        if teacher is not None:
            streams.update({f"teacher.{i}": t for i, t in enumerate(teacher)})
        tmp = self.folder / (STREAMS_FILE + ".tmp")
        if streams:
            save_file({k: v.detach().contiguous() for k, v in streams.items()}, str(tmp))
            os.replace(tmp, self.folder / STREAMS_FILE)
        self.finished.append(index)
        self.rows.extend(rows)
        self.info.setdefault("block_time_s", []).append(round(seconds, 3))
        self._write_json()

    def streams(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The (student, teacher) activations saved after the last finished block."""
        path = self.folder / STREAMS_FILE
        if not path.is_file():
            return [], None
        data = load_file(str(path))
        student = [data[f"student.{i}"] for i in range(sum(k.startswith("student.") for k in data))]
        n_teacher = sum(k.startswith("teacher.") for k in data)
        teacher = [data[f"teacher.{i}"] for i in range(n_teacher)] if n_teacher else None
        return student, teacher

    # ---------------------------------------------------------------- packing

    def start_packing(self, max_shard_bytes: int) -> int:
        """Begin (or continue) packing with shards of ``max_shard_bytes``; returns the tensors already packed."""
        if self.packing is None:
            for stale in self.folder.glob("model*.safetensors*"):  # shards of an abandoned packing plan
                stale.unlink()
            self.packing = {"max_shard_bytes": max_shard_bytes, "packed": 0, "packed_blocks": []}
            self._write_json()
        (self.folder / STREAMS_FILE).unlink(missing_ok=True)  # every block is done: no stream is needed again
        return int(self.packing["packed"])

    def packed(self, count: int, blocks: list[int]) -> None:
        """The first ``count`` output tensors are durably written: record it, then remove ``blocks``' files."""
        assert self.packing is not None, "start_packing first"
        self.packing["packed"] = count
        self.packing["packed_blocks"] = sorted(set(self.packing["packed_blocks"]) | set(blocks))
        self._write_json()
        for index in blocks:
            self.block_path(index).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove the resume files once the checkpoint itself is written."""
        shutil.rmtree(self.folder / BLOCKS_DIR, ignore_errors=True)
        for name in (STATE_FILE, STREAMS_FILE):
            (self.folder / name).unlink(missing_ok=True)

    def _write_json(self) -> None:
        data = {"version": STATE_VERSION, "key": self.key, "finished": self.finished, "rows": self.rows,
                "plan": self.plan, "info": self.info, "packing": self.packing}
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.folder / STATE_FILE)


def has_state(folder: Path) -> bool:
    """True when ``folder`` holds the progress of an interrupted compression."""
    return (folder / STATE_FILE).is_file()
