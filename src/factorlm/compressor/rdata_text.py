"""Jane Austen's novels from Debian's ``r-cran-janeaustenr``, read without R.

The package stores each novel as an R character vector (one element per printed line) in a
lazy-load database: ``data/Rdata.rdx`` (gzip of a serialized index of offsets) and
``data/Rdata.rdb`` (per object: a 4-byte length, then a zlib stream of R's XDR serialization).
:func:`unserialize` reads only the plain data types that these files use (vectors, strings,
pair lists, symbols); it builds lists, dicts and strings and never evaluates anything. The
``.deb`` itself (an ``ar`` archive holding ``data.tar.*``) can be read in place.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
INSTALLED = Path("/usr/lib/R/site-library/janeaustenr")
_DATA = "janeaustenr/data/Rdata"
_NIL = (254, 242, 251)  # NILVALUE, EMPTYENV, MISSINGARG
_PAIRS = (2, 5, 6, 15, 17)  # LISTSXP, PROMSXP, LANGSXP, DOTSXP, ATTRLISTSXP


def unserialize(buf: bytes, where: str = "R data") -> Any:
    """An R XDR (format 2 or 3) serialization as Python values: named vectors become dicts."""
    if buf[:2] != b"X\n":
        raise FactorlmError(f"{where}: not an R XDR serialization")
    pos, refs = 2, []

    def i32() -> int:
        nonlocal pos
        (v,) = struct.unpack_from(">i", buf, pos)
        pos += 4
        return v

    def item() -> Any:
        nonlocal pos
        flags = i32()
        kind = flags & 0xFF
        if kind in _NIL:
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            return refs[(flags >> 8 or i32()) - 1]
        if kind == 1:  # SYMSXP
            refs.append(item())
            return refs[-1]
        if kind == 9:  # CHARSXP
            n = i32()
            if n == -1:
                return None
            pos += n
            return buf[pos - n:pos].decode("utf-8", "replace")
        if kind in _PAIRS:
            if flags & 512:
                item()
            tag = item() if flags & 1024 else None
            head, rest = (tag, item()), item()
            return [head, *(rest if isinstance(rest, list) and rest and isinstance(rest[0], tuple) else [])]
        n = i32()
        if kind in (10, 13):  # LGLSXP, INTSXP
            value: list[Any] = list(struct.unpack_from(f">{n}i", buf, pos))
            pos += 4 * n
        elif kind == 14:  # REALSXP
            value = list(struct.unpack_from(f">{n}d", buf, pos))
            pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [item() for _ in range(n)]
        else:
            raise FactorlmError(f"{where}: unsupported R object type {kind}")
        if flags & 512:
            names = dict(item() or []).get("names")
            if names:
                return dict(zip(names, value))
        return value

    version = i32()
    i32(), i32()
    if version == 3:
        skip = i32()  # length of the native encoding name that follows
        pos += skip
    return item()


def _from_deb(path: Path) -> tuple[bytes, bytes]:
    """(Rdata.rdx, Rdata.rdb) bytes out of the package's ``.deb`` (ar archive of tarballs)."""
    blob = path.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise FactorlmError(f"{path}: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58])
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                files = {m.name: m for m in tar.getmembers() if m.isfile()}
                got = [next((tar.extractfile(m).read() for n, m in files.items() if n.endswith(_DATA + ext)), None)
                       for ext in (".rdx", ".rdb")]
        except tarfile.TarError as exc:
            raise FactorlmError(f"{path}: cannot read {name}: {exc}") from exc
        if got[0] is None or got[1] is None:
            raise FactorlmError(f"{path}: no {_DATA}.rdx/.rdb inside; is it r-cran-janeaustenr?")
        return got[0], got[1]
    raise FactorlmError(f"{path}: no data.tar member in the .deb")


def _from_dir(path: Path) -> tuple[bytes, bytes]:
    hits = sorted(path.rglob("Rdata.rdx"))
    hits = [h for h in hits if h.parent.parent.name == "janeaustenr"] or hits
    if not hits or not hits[0].with_suffix(".rdb").is_file():
        raise FactorlmError(f"{path}: no janeaustenr/data/Rdata.rdx + .rdb below this folder")
    return hits[0].read_bytes(), hits[0].with_suffix(".rdb").read_bytes()


def austen_novels(path: str | Path | None = None) -> dict[str, str]:
    """Novel name -> its text (lines joined by newlines), from a ``.deb``, a folder, or the R library."""
    p = Path(path) if path else INSTALLED
    if not p.exists():
        raise FactorlmError(f"{p}: Jane Austen data not found; run 'apt-get download r-cran-janeaustenr' and "
                            "pass --calib austen:FILE.deb")
    rdx, rdb = _from_deb(p) if p.is_file() else _from_dir(p)
    index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]), f"{p} (index)")
    variables = index.get("variables", {}) if isinstance(index, dict) else {}
    out = {}
    for name in NOVELS:
        if name not in variables:
            raise FactorlmError(f"{p}: novel {name!r} missing from the package index")
        offset, length = variables[name]
        lines = unserialize(zlib.decompress(rdb[offset + 4:offset + length]), f"{p} ({name})")
        out[name] = "\n".join(line or "" for line in lines)
    return out


def austen_text(path: str | Path | None = None) -> str:
    """The six novels in publication order, separated by blank lines."""
    return "\n\n\n".join(austen_novels(path).values())
