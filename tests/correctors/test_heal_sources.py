"""The Jane Austen text source: R lazy-load data read without R, from a folder or the .deb."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from factorlm.compressor.calib_sources import calibration_text
from factorlm.compressor.rdata_text import NOVELS, austen_novels, unserialize
from factorlm.runtime.format import FactorlmError


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str) -> bytes:
    b = s.encode()
    return _i(9) + _i(len(b)) + b


def _names_attr(names: list[str]) -> bytes:
    # pairlist with tag `names` -> character vector, then NULL
    return _i(2 | 1024) + _i(1) + _char("names") + _i(16) + _i(len(names)) + b"".join(map(_char, names)) + _i(254)


def _strsxp(items: list[str]) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(map(_char, items))


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040300) + _i(0x030500) + _i(5) + b"UTF-8" + body


def _package(root: Path, novels: dict[str, list[str]]) -> Path:
    rdb, offsets = b"", {}
    for name, lines in novels.items():
        blob = zlib.compress(_serialize(_strsxp(lines)))
        offsets[name] = (len(rdb), len(blob) + 4)
        rdb += _i(len(blob)) + blob
    variables = (_i(19 | 512) + _i(len(offsets))
                 + b"".join(_i(13) + _i(2) + _i(o) + _i(n) for o, n in offsets.values()) + _names_attr(list(offsets)))
    index = _i(19 | 512) + _i(2) + variables + _i(254) + _names_attr(["variables", "references"])
    data = root / "janeaustenr" / "data"
    data.mkdir(parents=True)
    (data / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (data / "Rdata.rdb").write_bytes(rdb)
    return root


def _deb(pkg: Path, out: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(pkg / "janeaustenr", arcname="./usr/lib/R/site-library/janeaustenr")
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())]
    blob = b"!<arch>\n"
    for name, body in members:
        blob += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        blob += b"\n" if len(body) % 2 else b""
    out.write_bytes(blob)
    return out


@pytest.fixture
def novels() -> dict[str, list[str]]:
    return {name: [name.upper(), "", f"It is a truth universally acknowledged ({name}).", "Ünïcode line."]
            for name in NOVELS}


def test_austen_from_folder_and_deb(tmp_path: Path, novels: dict[str, list[str]]) -> None:
    pkg = _package(tmp_path / "x", novels)
    got = austen_novels(pkg)
    assert list(got) == list(NOVELS)
    assert got["emma"] == "\n".join(novels["emma"])
    deb = _deb(pkg, tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb")
    assert austen_novels(deb) == got
    text = calibration_text(f"austen:{deb}")
    assert text.startswith("SENSESENSIBILITY") and "PERSUASION" in text and "Ünïcode" in text


def test_austen_bad_input_names_the_file(tmp_path: Path, novels: dict[str, list[str]]) -> None:
    with pytest.raises(FactorlmError, match="not found"):
        calibration_text(f"austen:{tmp_path / 'missing.deb'}")
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not an archive")
    with pytest.raises(FactorlmError, match="bad.deb"):
        austen_novels(bad)
    del novels["emma"]
    with pytest.raises(FactorlmError, match="emma"):
        austen_novels(_package(tmp_path / "y", novels))
    with pytest.raises(FactorlmError, match="not an R XDR"):
        unserialize(b"RDX2\n", "thing")
