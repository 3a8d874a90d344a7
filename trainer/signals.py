"""Graceful stops: SIGTERM, SIGUSR1 and SIGINT ask the training loop to stop at the next step
boundary, where every rank agrees, one checkpoint is written and the process exits with
STOPPED_EXIT_CODE; a later second signal ends the process at once, without a checkpoint.

Why these signals: SLURM sends SIGTERM to every process of a job at preemption and at the time
limit (SIGKILL follows after KillWait, often 30 s), `--signal=USR1@N` sends SIGUSR1 N seconds
before the limit, and Ctrl-C is SIGINT. The handler only records the request: the loop looks at
it between optimiser steps, so a checkpoint never holds half a step.

Why a repeat window: one event often arrives more than once. At preemption SLURM signals every
process of the step, ranks included, and torchrun forwards the same SIGTERM to its ranks a few
milliseconds later; a repeat within REPEAT_WINDOW_S counts as the same request. A signal after
that window is a person or a scheduler insisting, and the process ends by that signal.

Why `die_with_parent`: torchrun starts its ranks in their own sessions, so a signal torchrun
does not handle (SIGUSR1 on our torch versions, SIGKILL) ends torchrun and leaves the ranks
training as orphans. Under torchrun each rank asks the kernel for SIGTERM when its parent dies,
which turns into the same graceful stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

# EX_TEMPFAIL of sysexits.h: stopped early on request, the checkpoint is written, run it again
# (resume=auto) to continue. Scripts and schedulers tell it apart from success (0), a user
# mistake (2) and a crash.
STOPPED_EXIT_CODE = 75
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 2.0

_PARENT_AT_IMPORT = os.getppid()  # read as early as possible: see die_with_parent
_current: GracefulStop | None = None


def _say(msg: str) -> None:
    """One line on stderr from a signal handler: os.write, because a buffered print interrupted
    by the handler it runs in raises 'reentrant call'."""
    with contextlib.suppress(OSError):
        os.write(2, (msg + "\n").encode())


class GracefulStop:
    """Records the first stop request; `install()` routes the signals here (main thread only).

    `requested` is the name of the first signal (or another reason given to `request`), None
    while nobody asked. `verbose` prints the one-line notices (rank 0 only, to keep logs short).

    Why a watcher thread: Python runs a signal handler in the main thread, and only once that
    thread runs Python again; a rank blocked in a collective (waiting for a slow or stuck peer)
    or in a long C++ call would not even see a second signal. So the Python handlers do nothing,
    and the C-level handler's wakeup fd (`signal.set_wakeup_fd`) feeds a thread that acts at once."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.requested: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> GracefulStop:
        global _current
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        r, w = os.pipe()
        os.set_blocking(w, False)  # the C handler must never block
        self._pipe = (r, w)
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED:
            # a Python handler must be set for the signal to reach the wakeup fd; the thread acts
            self._previous[sig] = signal.signal(sig, _ignore_here)
        self._thread = threading.Thread(target=self._watch, args=(r,), name="graceful-stop", daemon=True)
        self._thread.start()
        _current = self
        return self

    def restore(self) -> None:
        global _current
        if not self.installed:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd)
        r, w = self._pipe
        os.close(w)  # the watcher reads EOF and ends
        self._thread.join(timeout=5)
        os.close(r)
        self._pipe = self._thread = None
        if _current is self:
            _current = None

    @contextlib.contextmanager
    def installed_for(self):
        """Installed for the `with` block unless it already was (then left as it is)."""
        mine = not self.installed
        if mine:
            self.install()
        try:
            yield self
        finally:
            if mine:
                self.restore()

    def request(self, reason: str) -> None:
        with self._lock:
            if self.requested is None:
                self.requested, self._first_at = reason, time.monotonic()

    def _watch(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:  # the C handler writes one byte per signal: its number
                if signum in _HANDLED_NUMBERS:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            first = self.requested is None
            if first:
                self.requested, self._first_at = name, time.monotonic()
            elif time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return  # the same event delivered again (SLURM and torchrun both signal the ranks)
        if first:
            if self.verbose:
                _say(f"received {name}: stopping at the next step boundary with a checkpoint "
                     f"(send it again to exit at once, without one)")
            return
        if self.verbose:
            _say(f"received {name} again: exiting now, without a checkpoint")
        os._exit(128 + signum)  # the status a shell gives a process ended by that signal


def _ignore_here(signum: int, frame) -> None:
    """The Python-level handler: the watcher thread of GracefulStop does the work."""


_HANDLED_NUMBERS = {int(s) for s in HANDLED}


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the wakeup fd but not the watcher thread:
    its signals must not land in the parent's pipe. It keeps ignoring the stop signals: SLURM
    signals every process of a job step, and a worker serves batches until the loop ends it."""
    if _current is not None:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_in_child)


def current() -> GracefulStop | None:
    """The installed GracefulStop, if any (tests wait on it)."""
    return _current


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux
    PR_SET_PDEATHSIG); returns whether that is in place. If the parent is already gone (it died
    before this call), the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != _PARENT_AT_IMPORT:
        os.kill(os.getpid(), sig)
    return True
