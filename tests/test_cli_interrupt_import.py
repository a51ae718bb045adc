"""A Ctrl-C during a deferred heavy import is held until the import completes, then raised."""

from __future__ import annotations

import signal
import sys

import pytest

from factorlm.cli import interrupt


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as Python does under a terminal, whatever the test runner inherited (nohup ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_inside_a_deferred_import_is_raised_after_it(tmp_path, monkeypatch, terminal_sigint):
    (tmp_path / "heavy_mod.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C half-way through the import\n"
        "for _ in range(1000):\n"
        "    pass\n"
        f"open({str(tmp_path / 'done')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(interrupt, "DEFERRED_IMPORTS", ("heavy_mod",))
    finder = interrupt.DeferInterruptsWhileImporting()
    others = [f for f in sys.meta_path if not isinstance(f, interrupt.DeferInterruptsWhileImporting)]
    monkeypatch.setattr(sys, "meta_path", [finder, *others])
    monkeypatch.delitem(sys.modules, "heavy_mod", raising=False)
    with pytest.raises(KeyboardInterrupt):
        import heavy_mod  # noqa: F401
    assert (tmp_path / "done").is_file()  # the module ran to its end before the interrupt surfaced
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the holding handler is gone
    interrupt.DeferInterruptsWhileImporting.install()  # idempotent: the finder is there already
    assert sum(isinstance(f, interrupt.DeferInterruptsWhileImporting) for f in sys.meta_path) == 1
