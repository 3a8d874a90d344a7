"""Run tasks in worker processes so that nothing hangs: a dead worker or Ctrl-C ends the run.

multiprocessing.Pool waits forever for the result of a task whose worker was killed (the OOM
killer, a SIGKILL), and on Ctrl-C every worker prints its own KeyboardInterrupt traceback while
the pool's shutdown can block. Here:

- tasks run in a `ProcessPoolExecutor`, which notices a worker that died and fails every
  pending task at once: that becomes one `WorkerDied` line (the rerun resumes);
- workers ignore SIGINT, so Ctrl-C reaches only the main process, which kills the workers and
  raises KeyboardInterrupt (the CLI prints `interrupted: rerun ...`, exit 130); SIGTERM (`kill
  PID`, what schedulers send, to the main process or the whole group) takes the same way out
  (`sigterm_interrupts`), and workers ignore it too;
- workers die with the main process, however it ends (even SIGKILL): on Linux the kernel kills
  them (PR_SET_PDEATHSIG), elsewhere each checks once a second that its parent is alive. An
  orphaned worker would go on writing shards into a directory that a rerun is cleaning;
- a task list never gets more workers than tasks (`--workers 400` for 2 shards forks 2).
Files half-written by killed workers carry temporary names; the rerun deletes them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from shardify.format import ShardifyError


class WorkerDied(ShardifyError):
    """A worker process ended without reporting (killed by a signal, out of memory)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the main process: stop as on Ctrl-C (a KeyboardInterrupt, so every
    clean-up that Ctrl-C runs runs)."""


@contextlib.contextmanager
def sigterm_interrupts():
    """While inside, SIGTERM raises `Terminated` in the main thread; a second SIGTERM (during
    the clean-up) ends the process at once. Outside (or off the main thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init(initializer, initargs, parent: int) -> None:
    # The main process alone handles Ctrl-C and SIGTERM (a terminal or `scancel` signals the
    # whole group): it kills the workers itself, and they die with it if it is killed outright.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _die_with_parent(parent: int) -> None:
    """End this worker when the process that forked it ends, whatever ends it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pdeathsig = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: no prctl
        pdeathsig = False
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)
    if not pdeathsig:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="shardify-parent-watch", daemon=True).start()


def run_in_workers(func: Callable, tasks: Iterable, workers: int, initializer=None, initargs=(),
                   on_result: Callable | None = None, poll: Callable | None = None,
                   what: str = "work") -> list:
    """Run `func(task)` for every task in `workers` forked processes; return results in task order.

    `on_result(i, result)` is called in the main process as each task finishes (in any order);
    `poll()` is called about every 50 ms while waiting (progress messages). A worker that dies
    raises WorkerDied naming `what`; an exception inside a task is re-raised as is.
    """
    tasks = list(tasks)
    results: list = [None] * len(tasks)
    before = set(mp.active_children())
    workers = max(1, min(workers, len(tasks)))  # the pool forks all of them up front
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                             initializer=_init, initargs=(initializer, initargs, os.getpid()))
    clean = False
    try:
        futures = {ex.submit(func, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            if poll is not None:
                poll()
            for fut in done:
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise WorkerDied(
                        f"a worker process died while doing {what} (killed by a signal or the "
                        "out-of-memory killer?); rerun the same command to resume"
                    ) from None
                results[futures[fut]] = result
                if on_result is not None:
                    on_result(futures[fut], result)
        clean = True
        return results
    finally:
        if clean:
            ex.shutdown(wait=True)
        else:  # an error, a dead worker or Ctrl-C: stop the others now, without waiting for them
            _kill(ex, before)
            # The pool's manager thread notices the dead workers and ends; waiting for it here
            # (bounded: nothing may hang on the way out) keeps its clean-up from printing
            # errors at interpreter exit.
            manager = getattr(ex, "_executor_manager_thread", None)
            ex.shutdown(wait=False, cancel_futures=True)
            if manager is not None:
                manager.join(timeout=5)
                if manager.is_alive():
                    _stuck.append(manager)


_stuck: list = []  # pool manager threads that a forced stop left running


def exit_if_stuck(code: int) -> None:
    """Exit with `code` now if a forced stop left a pool's manager thread running (seen once in
    a full test run, after Ctrl-C): the interpreter's shutdown joins that thread without a
    timeout and would hang. Output is flushed; every file shardify
    writes is committed by a rename, so nothing is left half-done that a rerun does not clean."""
    if any(t.is_alive() for t in _stuck):
        exit_now(code)


def exit_now(code: int) -> None:
    """End the process with `code` at once, after flushing output and logging: no interpreter
    teardown, no joining of threads or children."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _kill(ex: ProcessPoolExecutor, before: set) -> None:
    """SIGKILL the pool's workers, including any the pool did not register yet (a Ctrl-C that
    lands while it forks): a worker left alive would block the interpreter's exit, which joins
    every child process."""
    procs = set((getattr(ex, "_processes", None) or {}).values()) | (set(mp.active_children()) - before)
    for p in procs:
        if p.is_alive():
            p.kill()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
