"""Packing the streamed output: block files removed as they are packed, and resume after a kill mid-packing."""

from __future__ import annotations

import json

import pytest
import torch

from factorlm.compressor import streamed
from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint
from factorlm.compressor.resume import ResumeState
from factorlm.runtime.checkpoint import partial_dir, safetensors_files
from factorlm.runtime.format import FactorlmError
from factorlm.testing import checkpoint_tensors, save_tiny_dense

LAYERS = 6
SHAPE = dict(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256)
RECIPE = dict(method="saes", keep=0.6, calib_samples=4, calib_len=16)
SHARD = "200KB"


class _Killed(Exception):
    pass


def _same_checkpoint(a, b) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def src_and_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    src = save_tiny_dense(root / "src", dtype=torch.bfloat16, **SHAPE)
    full, _ = compress_checkpoint(src, root / "full", CompressionRecipe(**RECIPE), progress=False,
                                  max_shard_size=SHARD)
    return src, full


def test_block_files_go_as_they_are_packed_so_disk_peaks_near_output_plus_one_block(src_and_full, tmp_path,
                                                                                      monkeypatch):
    src, full = src_and_full
    seen: list[tuple[int, int, int]] = []  # (bytes in the folder, block files left, largest block file)
    original = ResumeState.packed

    def packed(self, count, blocks):
        files = list((self.folder / "blocks").glob("*.safetensors"))
        seen.append((_bytes(self.folder), len(files), max(f.stat().st_size for f in files)))
        original(self, count, blocks)
        assert not any(self.block_path(i).exists() for i in blocks)

    monkeypatch.setattr(ResumeState, "packed", packed)
    out, _ = compress_checkpoint(src, tmp_path / "out", CompressionRecipe(**RECIPE), progress=False,
                                 max_shard_size=SHARD)
    assert len(safetensors_files(out)) > 2  # several shards
    assert [n for _, n, _ in seen] == list(range(LAYERS, 0, -1))  # one block file fewer after each block
    output = sum(f.stat().st_size for f in safetensors_files(out))
    block = max(b for _, _, b in seen)
    peak = max(b for b, _, _ in seen)
    # the folder never holds the output twice: at most the output, one block file and small json/headers
    assert peak <= output + block + 64 * 1024, (peak, output, block)
    assert peak < output + 2 * block
    _same_checkpoint(out, full)


@pytest.mark.parametrize("where", ["after_a_packed_block", "inside_a_block"])
def test_resume_after_a_kill_while_packing_gives_the_uninterrupted_checkpoint(src_and_full, tmp_path,
                                                                            monkeypatch, where):
    src, full = src_and_full
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if where == "after_a_packed_block":
            original = ResumeState.packed

            def packed(self, count, blocks):
                original(self, count, blocks)
                if blocks == [2]:
                    raise _Killed("simulated kill after block 2 was packed")
            m.setattr(ResumeState, "packed", packed)
        else:  # die half-way through block 3's tensors: bytes written past the recorded progress
            get, calls = streamed._BlockFiles.get, []

            def fetch(self, index, name):
                if index == 3:
                    calls.append(name)
                    if len(calls) == 4:
                        raise _Killed("simulated kill inside block 3")
                return get(self, index, name)
            m.setattr(streamed._BlockFiles, "get", fetch)
        with pytest.raises(_Killed):
            compress_checkpoint(src, out, CompressionRecipe(**RECIPE), progress=False, max_shard_size=SHARD)
    tmp = partial_dir(out)
    state = json.loads((tmp / "factorlm_resume.json").read_text())
    assert state["packing"]["packed_blocks"] == [0, 1, 2]
    assert sorted(p.name for p in (tmp / "blocks").iterdir()) == [f"block-0000{i}.safetensors" for i in (3, 4, 5)]
    assert not (tmp / "factorlm_streams.safetensors").exists()
    with pytest.raises(FactorlmError, match="--max-shard-size 200000"):
        compress_checkpoint(src, out, CompressionRecipe(**RECIPE), progress=False, max_shard_size="1MB", resume=True)
    assert has_progress(tmp)  # the refusal keeps the progress
    loaded: list[int] = []
    monkeypatch.setattr(streamed.SourceBlocks, "load", lambda self, i, b: loaded.append(i))
    path, report = compress_checkpoint(src, out, CompressionRecipe(**RECIPE), progress=False, max_shard_size=SHARD,
                                       resume=True)
    assert loaded == [] and len(report["layers"]) == LAYERS * 7  # no block is redone
    assert not tmp.exists()
    _same_checkpoint(path, full)


def has_progress(tmp) -> bool:
    return (tmp / "factorlm_resume.json").is_file() and (tmp / "blocks" / "block-00003.safetensors").is_file()


def test_a_new_shard_size_repacks_when_no_block_file_is_gone_yet(src_and_full, tmp_path, monkeypatch):
    src, full = src_and_full
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        def killed(self, count, blocks):
            raise _Killed("simulated kill before the first block is recorded as packed")
        m.setattr(ResumeState, "packed", killed)
        with pytest.raises(_Killed):
            compress_checkpoint(src, out, CompressionRecipe(**RECIPE), progress=False, max_shard_size="1MB")
    assert any(partial_dir(out).glob("model*.safetensors"))  # a shard of the abandoned plan
    path, _ = compress_checkpoint(src, out, CompressionRecipe(**RECIPE), progress=False, max_shard_size=SHARD,
                                  resume=True)
    _same_checkpoint(path, full)
