"""Comma-joined calibration sources: interleaved in paragraph blocks, each spread over the stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorlm.compressor.calib_sources import calibration_text, mixed_text, paragraph_blocks
from factorlm.runtime.format import FactorlmError


def _write(path: Path, tag: str, paragraphs: int) -> Path:
    path.write_text("\n\n".join(f"{tag} paragraph {i} " + "x" * 390 for i in range(paragraphs)), encoding="utf-8")
    return path


def test_paragraph_blocks_keep_whole_paragraphs_in_order():
    text = "\n\n".join(f"p{i} " + "y" * 10 for i in range(7))
    blocks = paragraph_blocks(text, block_chars=30)
    assert [len(b.split("\n\n")) for b in blocks] == [3, 3, 1]
    assert "\n\n".join(blocks) == text


def test_mix_spreads_every_source_over_the_whole_stream(tmp_path):
    a = _write(tmp_path / "a.txt", "AAA", 300)
    b = _write(tmp_path / "b.txt", "BBB", 100)
    text = calibration_text(f"{a},{b}")
    paragraphs = text.split("\n\n")
    assert sorted(paragraphs) == sorted(a.read_text().split("\n\n") + b.read_text().split("\n\n"))
    # each source keeps its own order
    for tag in ("AAA", "BBB"):
        own = [int(p.split()[2]) for p in paragraphs if p.startswith(tag)]
        assert own == sorted(own)
    # the last tenth (finetuning's held-out part) holds both, near their 3:1 share
    tail = paragraphs[-len(paragraphs) // 10:]
    share_b = sum(p.startswith("BBB") for p in tail) / len(tail)
    assert 0.1 < share_b < 0.45


def test_mix_of_one_text_is_that_text():
    text = "\n\n".join(f"q{i}" for i in range(5))
    assert mixed_text([text], block_chars=3) == text


def test_file_name_with_a_comma_is_a_file(tmp_path):
    path = _write(tmp_path / "a,b.txt", "CCC", 3)
    assert calibration_text(str(path)) == path.read_text()


def test_mix_errors_name_the_part(tmp_path):
    a = _write(tmp_path / "a.txt", "AAA", 3)
    with pytest.raises(FactorlmError, match="empty entry"):
        calibration_text(f"{a},,{a}")
    with pytest.raises(FactorlmError, match="missing.txt: calibration file not found"):
        calibration_text(f"{a},{tmp_path / 'missing.txt'}")
