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
    while nobody asked. `verbose` prints the one-line notices (rank 0 only, to keep logs short)."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.requested: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> GracefulStop:
        global _current
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self  # Python routes signals to the main thread only: a loop elsewhere polls nothing
        self._pid = os.getpid()
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        _current = self
        return self

    def restore(self) -> None:
        global _current
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
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
        if self.requested is None:
            self.requested, self._first_at = reason, time.monotonic()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker inherits this handler; SLURM signals every process of the
            # step, workers included: they keep serving batches until the loop stops with them
            return
        name = signal.Signals(signum).name
        if self.requested is None:
            self.request(name)
            if self.verbose:
                _say(f"received {name}: stopping at the next step boundary with a checkpoint "
                     f"(send it again to exit at once, without one)")
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same event delivered again (SLURM and torchrun both signal the ranks)
        if self.verbose:
            _say(f"received {name} again: exiting now, without a checkpoint")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end by the signal itself: the status a shell expects


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
