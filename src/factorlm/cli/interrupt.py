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
serving``) the watchdog leaves Ctrl-C to it.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

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
