"""Ctrl-C that works anywhere: one line, exit code 130, no partial output left behind.

Python turns SIGINT into ``KeyboardInterrupt`` only between bytecodes, so a main thread
inside one long native call (a fast tokenizer over a whole corpus, a large SVD, a GEMM)
does not see Ctrl-C until the call returns, which can be minutes. Those calls release the
GIL, so a watchdog thread can act: the signal handler's wakeup fd tells it a SIGINT
arrived; it gives the main thread ``grace_s`` to unwind normally (the ``KeyboardInterrupt``
path runs every cleanup), and if the main thread is still busy, or on a second Ctrl-C, it
removes the partial outputs the command was writing (hidden ``.NAME.*`` siblings of its
outputs that appeared during the run), prints the line and ends the process with 130.
While another SIGINT handler is installed (uvicorn in ``serve``, asyncio in ``bench
serving``) the watchdog leaves Ctrl-C to it. A Ctrl-C during ``import torch`` is held until
the import is complete (:class:`DeferInterruptsWhileImporting`): interrupted half-way, torch
can swallow it or fail the next import.
"""

from __future__ import annotations

import importlib.abc
import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

from ..runtime.import_hooks import WrappingLoader, wrapped_spec

INTERRUPTED = "factorlm: interrupted; no partial output was written"


class InterruptWatchdog:
    """Start with :meth:`start` in the main thread, :meth:`stop` when the command ends."""

    def __init__(self, grace_s: float = 3.0) -> None:
        self.grace_s = grace_s
        self._outputs: dict[Path, set[str]] = {}
        self._done = threading.Event()
        self._announced = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def start(self) -> None:
        """Listen for SIGINT; a no-op outside the main thread or when SIGINT is not Python's to handle."""
        if (sys.platform == "win32" or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(write_fd, False)
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (OSError, ValueError):
            os.close(read_fd)
            os.close(write_fd)
            return
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch, name="factorlm-interrupt", daemon=True).start()

    def watch_outputs(self, paths: Sequence[str | os.PathLike]) -> None:
        """Outputs whose hidden partial siblings (``.NAME.*``, new since now) a hard exit removes."""
        for path in paths:
            out = Path(path).absolute()
            self._outputs[out] = set(self._partials(out))

    def announce(self) -> bool:
        """Claim the one line about the interrupt (False when the other thread has printed it)."""
        return self._announced.acquire(blocking=False)

    def stop(self) -> None:
        self._done.set()
        if self._pipe is None:
            return
        try:
            signal.set_wakeup_fd(self._previous_fd)
        except ValueError:
            pass
        os.close(self._pipe[1])  # wakes the watchdog's select; it sees _done and ends
        self._pipe = None

    @staticmethod
    def _partials(out: Path) -> list[str]:
        try:
            return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        except OSError:
            return []

    def _watch(self) -> None:
        read_fd = self._pipe[0] if self._pipe else -1
        try:
            if not self._wait_for(read_fd, None):
                return  # the command ended without a Ctrl-C
            self._wait_for(read_fd, self.grace_s)  # a second Ctrl-C or the grace period ends the wait
            if not self._done.is_set():
                self._hard_exit()
        finally:
            os.close(read_fd)

    def _wait_for(self, fd: int, timeout: float | None) -> bool:
        """Block until a SIGINT byte arrives (True) or the command ends / ``timeout`` passes (False)."""
        while not self._done.is_set():
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return False  # the grace period passed
            data = os.read(fd, 64)
            if not data:
                return False  # stop() closed the pipe
            if signal.SIGINT in data and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                return True  # (a server or asyncio that installed its own SIGINT handler runs its own shutdown)
        return False

    def _hard_exit(self) -> None:
        for out, before in self._outputs.items():
            for name in set(self._partials(out)) - before:
                shutil.rmtree(out.parent / name, ignore_errors=True)
        if self.announce():
            sys.stderr.write(INTERRUPTED + "\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)


# --------------------------------------------------------------------------- interrupts during heavy imports

DEFERRED_IMPORTS = ("torch",)


class _DeferringLoader(WrappingLoader):
    """Runs the real loader's ``exec_module`` with SIGINT held back, then re-raises a held Ctrl-C.

    A ``KeyboardInterrupt`` that lands inside torch's own import leaves it half-initialised:
    the interrupt can be swallowed there (the command then runs to the end) or the next import
    fails with a RuntimeError. Holding SIGINT until the import is complete makes Ctrl-C at
    start-up always the clean exit 130.
    """

    def exec_module(self, module: ModuleType) -> None:
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            self.inner.exec_module(module)
            return
        held: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        try:
            self.inner.exec_module(module)
        finally:
            signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt


class DeferInterruptsWhileImporting(importlib.abc.MetaPathFinder):
    """A meta path finder that wraps the top-level import of :data:`DEFERRED_IMPORTS` in a
    :class:`_DeferringLoader`; install it with :meth:`install` (idempotent), in the CLI only."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname not in DEFERRED_IMPORTS:
            return None
        return wrapped_spec(self, fullname, path, target, _DeferringLoader)

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())
