"""The hand-made case families of fuzz_server.py: invalid Unicode, limits, hostile transport.

Each case is recorded as (family, case, outcome) with outcome an HTTP status, ``closed``
(the server closed the connection without an answer, as it should for unfinished
headers) or ``reset``; only a 5xx outcome is a failure.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import socket
import time
from typing import Any

import _serving

JSON = {"content-type": "application/json"}
MIB = 1024 * 1024


class Recorder:
    """Counts outcomes per (family, case); keeps the first 5xx failures."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}
        self.reasons: collections.Counter[str] = collections.Counter()
        self.total = self.count_5xx = self.broken = 0

    def add(self, family: str, case: str, outcome: int | str, request: Any = None, response: str = "") -> None:
        self.total += 1
        self.outcomes[f"{family} | {case} | {outcome}"] += 1
        if isinstance(outcome, int) and outcome >= 500:
            self.count_5xx += 1
            if len(self.failures) < 50:
                self.failures.append({"family": family, "case": case, "status": outcome,
                                      "request": request if isinstance(request, (dict, list, str)) else repr(request),
                                      "response": response[:500]})

    def summary(self) -> dict[str, Any]:
        return {"total_cases": self.total, "count_5xx": self.count_5xx, "connections_broken": self.broken,
                "outcomes": dict(sorted(self.outcomes.items())), "failures": self.failures, "notes": self.notes,
                "clean_positive_4xx_reasons": dict(self.reasons.most_common(15))}


def healthy(server: _serving.Server) -> bool:
    import httpx

    try:
        ok = httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        body = {"model": server.model, "prompt": "Hello", "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=120)
        return ok and r.status_code == 200
    except httpx.HTTPError:
        return False


# ---- invalid Unicode ------------------------------------------------------------------------------
def _fields(model: str) -> dict[str, tuple[str, Any]]:
    """Where a fuzzed string goes: name -> (route, body builder)."""
    base = {"model": model, "max_tokens": 2, "temperature": 0}
    msg = [{"role": "user", "content": "hi"}]
    return {
        "prompt": ("/v1/completions", lambda t: {**base, "prompt": t}),
        "prompt list": ("/v1/completions", lambda t: {**base, "prompt": ["ok", t]}),
        "model": ("/v1/completions", lambda t: {**base, "model": t, "prompt": "x"}),
        "stop": ("/v1/completions", lambda t: {**base, "prompt": "x", "stop": [t]}),
        "user": ("/v1/completions", lambda t: {**base, "prompt": "x", "user": t}),
        "logit_bias key": ("/v1/completions", lambda t: {**base, "prompt": "x", "logit_bias": {t: 1.0}}),
        "field name": ("/v1/completions", lambda t: {**base, "prompt": "x", t: 1}),
        "chat content": ("/v1/chat/completions", lambda t: {**base, "messages": [{"role": "user", "content": t}]}),
        "chat text part": ("/v1/chat/completions", lambda t: {
            **base, "messages": [{"role": "user", "content": [{"type": "text", "text": t}]}]}),
        "chat name": ("/v1/chat/completions", lambda t: {
            **base, "messages": [{"role": "user", "content": "hi", "name": t}]}),
        "chat tools": ("/v1/chat/completions", lambda t: {
            **base, "messages": msg, "tools": [{"type": "function", "function": {"name": t}}]}),
    }


PLACEHOLDER = "\ue000PLACEHOLDER\ue000"
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xf8"]


def encode_body(body: Any, how: str, bad: bytes) -> bytes:
    """JSON bytes: 'escape' (\\udXXX escapes), 'raw' (surrogates as CESU-8 bytes), 'bad-bytes' (invalid UTF-8)."""
    if how == "escape":
        return json.dumps(body, ensure_ascii=True).encode()
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return raw.replace(PLACEHOLDER.encode(), bad, 1) if how == "bad-bytes" else raw


def unicode_fuzz(server: _serving.Server, examples: int, seed: int, record: Recorder) -> None:
    import httpx
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = _fields(server.model)
    odd = st.sampled_from(["\x00", "\ufeff", "\ufffe", "\uffff", "\U0010ffff", "\u202e", "\ud800", "\udfff", "\udbff"])
    piece = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), odd)
    text = st.lists(piece, min_size=0, max_size=12).map("".join)
    client = httpx.Client(base_url=server.url, headers=server.headers(), timeout=300)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[hypothesis.Phase.generate])
    @given(field=st.sampled_from(sorted(fields)), value=text, how=st.sampled_from(["escape", "raw", "bad-bytes"]),
           bad=st.sampled_from(BAD_BYTES), where=st.integers(0, 12))
    @hypothesis.seed(seed)
    def check(field: str, value: str, how: str, bad: bytes, where: int) -> None:
        route, build = fields[field]
        if how == "bad-bytes":
            value = value[:where] + PLACEHOLDER + value[where:]
        content = encode_body(build(value), how, bad)
        try:
            r = client.post(route, content=content, headers=JSON)
        except httpx.TransportError as exc:
            record.add("unicode", f"{field} ({how})", f"transport error {type(exc).__name__}", content.decode("latin-1"))
            return
        record.add("unicode", f"{field} ({how})", r.status_code, content.decode("latin-1"), r.text)
        if r.status_code == 400 and r.headers.get("connection") != "close":
            again = client.get("/v1/models")
            if _local_port(again) != _local_port(r):
                record.broken += 1

    try:
        check()
    finally:
        client.close()


def _local_port(response: Any) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


# ---- limits ---------------------------------------------------------------------------------------
def limit_cases(server: _serving.Server, max_batch: int, record: Recorder) -> None:
    import httpx

    m = server.model
    big_text = "lorem ipsum " * (4_000_000 // 12)  # ~4 MB, under the 4 MiB body limit
    cases: list[tuple[str, str, Any, dict[str, str] | None]] = [
        ("4 MB prompt", "/v1/completions", {"model": m, "prompt": big_text}, None),
        ("4 MB chat message", "/v1/chat/completions",
         {"model": m, "messages": [{"role": "user", "content": big_text}]}, None),
        ("4.5 MiB prompt (over the body limit)", "/v1/completions", {"model": m, "prompt": "x" * (4 * MIB + MIB // 2)},
         None),
        ("token ids beyond the context", "/v1/completions", {"model": m, "prompt": [1] * 9000}, None),
        ("token id out of vocabulary", "/v1/completions", {"model": m, "prompt": [10**9]}, None),
        ("max_tokens beyond the limit", "/v1/completions", {"model": m, "prompt": "x", "max_tokens": 10**6}, None),
        ("n x prompts above --max-batch", "/v1/completions",
         {"model": m, "prompt": ["a"] * (max_batch // 2 + 1), "n": 2, "max_tokens": 2}, None),
        ("prompts above --max-batch", "/v1/completions",
         {"model": m, "prompt": ["a"] * (max_batch + 1), "max_tokens": 2}, None),
        ("chat n at --max-batch", "/v1/chat/completions",
         {"model": m, "messages": [{"role": "user", "content": "hi"}], "n": max_batch, "max_tokens": 2}, None),
        ("stream n=3 with stops", "/v1/completions",
         {"model": m, "prompt": "Once", "n": 3, "stream": True, "stop": ["", "\n", " the"], "max_tokens": 8}, None),
        ("logprobs 20, one token", "/v1/completions", {"model": m, "prompt": "x", "logprobs": 20, "max_tokens": 1},
         None),
        ("no API key", "/v1/completions", {"model": m, "prompt": "x"}, {}),
        ("wrong API key", "/v1/completions", {"model": m, "prompt": "x"}, {"Authorization": "Bearer nope"}),
    ]
    raw: list[tuple[str, str, bytes]] = [
        ("deeply nested JSON", "/v1/completions", b"[" * 200_000 + b"]" * 200_000),
        ("NaN temperature", "/v1/completions", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % m.encode()),
        ("Infinity top_p", "/v1/completions", b'{"model": "%s", "prompt": "x", "top_p": Infinity}' % m.encode()),
        ("1e400 temperature", "/v1/completions", b'{"model": "%s", "prompt": "x", "temperature": 1e400}' % m.encode()),
        ("seed 2**64", "/v1/completions", b'{"model": "%s", "prompt": "x", "seed": 18446744073709551616}' % m.encode()),
        ("huge integer", "/v1/completions", b'{"model": "%s", "prompt": "x", "max_tokens": 1%s}' % (m.encode(),
                                                                                                 b"0" * 5000)),
        ("empty body", "/v1/completions", b""),
        ("null body", "/v1/chat/completions", b"null"),
        ("UTF-16 body", "/v1/completions", json.dumps({"model": m, "prompt": "x"}).encode("utf-16")),
        ("BOM + JSON", "/v1/completions", b"\xef\xbb\xbf" + json.dumps({"model": m, "prompt": "x"}).encode()),
        ("duplicate keys", "/v1/completions", b'{"model": "%s", "prompt": "x", "prompt": 5}' % m.encode()),
    ]
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for name, route, body, headers in cases:
            h = server.headers() if headers is None else headers
            try:
                r = client.post(route, json=body, headers=h)
                record.add("limits", name, r.status_code, name, r.text)
            except httpx.TransportError as exc:
                record.add("limits", name, f"transport error {type(exc).__name__}")
        for name, route, content in raw:
            try:
                r = client.post(route, content=content, headers={**JSON, **server.headers()})
                record.add("limits", name, r.status_code, name, r.text)
            except httpx.TransportError as exc:
                record.add("limits", name, f"transport error {type(exc).__name__}")
        for method, route, name in [("GET", "/v1/completions", "GET on a POST route"), ("POST", "/health", "POST /health"),
                                    ("GET", "/v1/nothing", "unknown route"), ("DELETE", "/v1/models", "DELETE")]:
            r = client.request(method, route, headers=server.headers())
            record.add("limits", name, r.status_code, name, r.text)


# ---- transport --------------------------------------------------------------------------------------
def _status(data: bytes) -> int | str:
    if data.startswith(b"HTTP/"):
        return int(data.split(b" ", 2)[1])
    return "closed" if not data else "garbage"


def raw_exchange(port: int, parts: list[bytes], *, pause_s: float = 0.0, read_s: float = 60.0) -> tuple[int | str, float]:
    """Send ``parts`` (pausing between them), read until the server closes; (first status or 'closed'/'reset', s)."""
    started = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
            try:
                for i, part in enumerate(parts):
                    if i and pause_s:
                        time.sleep(pause_s)
                    s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading (e.g. after a 413): see what it answered
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    return (_status(data) if data else "reset"), time.monotonic() - started
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return "no answer (client timeout)", time.monotonic() - started
    return _status(data), time.monotonic() - started


def _post_head(server: _serving.Server, extra: str = "", path: str = "/v1/completions") -> bytes:
    auth = server.headers()["Authorization"]
    return (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
            f"{extra}").encode()


def _chunked(body: bytes, size: int = 65536) -> list[bytes]:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return parts + [b"0\r\n\r\n"]


def _big_chunks(total: int, size: int = MIB) -> list[bytes]:
    chunk = b"%x\r\n%s\r\n" % (size, b" " * size)
    return [chunk] * (total // size) + [b"0\r\n\r\n"]


def transport_cases(server: _serving.Server, body_timeout: float, header_timeout: float, record: Recorder) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    ok = json.dumps({"model": server.model, "prompt": "Hello", "max_tokens": 2}).encode()
    chunked = _post_head(server, "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    length = _post_head(server, f"Content-Length: {len(ok)}\r\nConnection: close\r\n\r\n")
    health = b"GET /health HTTP/1.1\r\nHost: fuzz\r\n"
    cases: dict[str, tuple[list[bytes], float, float | None]] = {  # name -> (parts, pause, expected close time)
        "chunked, small": ([chunked, *_chunked(ok, 7)], 0.0, None),
        "chunked, 6 MiB": ([chunked, *_big_chunks(6 * MIB)], 0.0, None),
        "chunked, 300 MiB": ([chunked, *_big_chunks(300 * MIB)], 0.0, None),
        "chunked, malformed size": ([chunked, b"zz\r\nabc\r\n0\r\n\r\n"], 0.0, None),
        "chunked, half-sent": ([chunked, b"%x\r\n%s" % (len(ok), ok[:10])], 0.0, body_timeout),
        "chunked, slow drip": ([chunked] + [b"1\r\n \r\n"] * 40, 0.1, body_timeout),
        "content-length, announced 5 MiB": ([_post_head(server, f"Content-Length: {5 * MIB}\r\n\r\n")], 0.0, None),
        "content-length, half-sent": ([_post_head(server, "Content-Length: 100\r\n\r\n"), ok[:10]], 0.0,
                                      body_timeout),
        "content-length, not a number": ([_post_head(server, "Content-Length: 12a\r\n\r\n"), ok], 0.0, None),
        "content-length and chunked": ([_post_head(server, "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
                                        *_chunked(ok)], 0.0, None),
        "expect 100-continue, 5 MiB": ([_post_head(server, f"Expect: 100-continue\r\nContent-Length: {5 * MIB}\r\n\r\n")],
                                       0.0, None),
        "headers, unfinished": ([health], 0.0, header_timeout),
        "headers, silent connection": ([b""], 0.0, header_timeout),
        "headers, 100 KiB": ([health + b"X-Big: " + b"a" * 100 * 1024 + b"\r\n\r\n"], 0.0, None),
        "headers, 1 MiB": ([health + b"X-Big: " + b"a" * MIB + b"\r\n\r\n"], 0.0, None),
        "headers, 2000 of them": ([health + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n"], 0.0, None),
        "request line, invalid": ([b"GARBAGE\r\n\r\n"], 0.0, None),
        "HTTP/1.0 GET": ([b"GET /health HTTP/1.0\r\n\r\n"], 0.0, None),
        "pipelined GETs": ([health + b"\r\n" + health + b"Connection: close\r\n\r\n"], 0.0, None),
        "content-length body, valid": ([length, ok], 0.0, None),
        "authorization, non-latin-1 bytes": ([b"GET /v1/models HTTP/1.1\r\nHost: f\r\nAuthorization: Bearer \xff\xfe"
                                              b"\r\nConnection: close\r\n\r\n"], 0.0, None),
    }
    rss_before = _serving.rss_mib(server.pid)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(raw_exchange, port, parts, pause_s=pause) for name, (parts, pause, _) in
                   cases.items()}
        for name, future in futures.items():
            outcome, seconds = future.result()
            expected = cases[name][2]
            if expected is not None:  # a deadline case: say when it ended, rounded to the second
                outcome = f"{outcome} after {round(seconds):.0f} s"
            record.add("transport", name, outcome, name)
    record.notes["transport_rss_growth_mib"] = round(_serving.rss_mib(server.pid) - rss_before, 1)
