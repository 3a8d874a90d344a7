"""Options and reporting shared by every `shardify <dataset>` command.

`job_options` adds the options every job has (output, order, parallelism, node split, resume,
reject budget); `execute` runs the job and prints the reconciliation line and a reject summary.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys

import click

from shardify.format import ShardifyError
from shardify.job import JobOptions, run_job
from shardify.workers import Terminated, exit_if_stuck, exit_now, sigterm_interrupts


def _slurm_default(kind: str) -> int:
    """Default node count/rank from a SLURM array job (or a multi-task step), else 1/0."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        if kind == "count":
            return int(env["SLURM_ARRAY_TASK_COUNT"])
        return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_NTASKS"]) if kind == "count" else int(env["SLURM_PROCID"])
    return 1 if kind == "count" else 0


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing nan (which compares false with every bound, so it passed
    them, and `--max-reject-rate nan` then turned the reject check off)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


REJECT_RATE = FiniteFloatRange(0, 1)  # --max-reject-rate: a share of the inputs


def job_options(func):
    """Add the shared job options; the command receives `out`, `job` (JobOptions), `max_reject_rate`,
    `source_dir` and `revision`."""
    options = [
        click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                     help="Output directory for shards, manifest.json, sizes.json, rejects.jsonl."),
        click.option("--source", "source_dir", type=click.Path(), default=None,
                     help="Read a local directory laid out like the hub repo instead of the hub."),
        click.option("--revision", default=None,
                     help="Hub revision (branch, tag or commit); default main, recorded as a commit."),
        click.option("--seed", default=0, show_default=True, help="Seed of the order of samples across shards."),
        click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1)),
        click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Parallel worker processes on this node."),
        click.option("--num-nodes", default=None, type=click.IntRange(min=1),
                     help="Invocations sharing the job (default: from a SLURM array, else 1)."),
        click.option("--node-rank", default=None, type=click.IntRange(min=0),
                     help="This invocation's index (default: from a SLURM array, else 0)."),
        click.option("--overwrite", is_flag=True, help="Start over when DIR holds shards written with other options."),
        click.option("--max-reject-rate", default=0.01, show_default=True, type=REJECT_RATE,
                     help="Exit with status 1 when more than this share of inputs is rejected."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option("--hash-thread", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Compute sha256 in a helper thread of each worker (auto: when workers < cores)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, seed, samples_per_shard, workers, num_nodes, node_rank, overwrite, no_progress,
                hash_thread, **kwargs):
        num_nodes = num_nodes if num_nodes is not None else _slurm_default("count")
        node_rank = node_rank if node_rank is not None else _slurm_default("rank")
        job = JobOptions(seed=seed, samples_per_shard=samples_per_shard, workers=workers,
                         num_nodes=num_nodes, node_rank=node_rank, overwrite=overwrite,
                         progress=not no_progress, hash_thread={"auto": None, "on": True, "off": False}[hash_thread])
        return func(*args, job=job, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def execute(source, out: str, splits: list[str], job: JobOptions, max_reject_rate: float) -> dict | None:
    """Run the job, print what happened, and exit 1 when the reject budget is exceeded."""
    manifest = run_job(source, out, splits, job)
    if manifest is None:
        return None
    report(manifest, out)
    check_reject_rate(manifest, max_reject_rate)
    return manifest


def report(manifest: dict, out: str) -> None:
    for split, info in manifest["splits"].items():
        click.echo(f"{split}: inputs = written + rejected: {info['inputs']} = {info['samples']} + "
                   f"{info['rejected']} ({len(info['shards'])} shards, {info['bytes'] / 1e6:.1f} MB)")
    reasons = collections.Counter()
    rejects_path = os.path.join(out, "rejects.jsonl")
    if os.path.exists(rejects_path):
        import json

        with open(rejects_path, encoding="utf-8") as f:
            reasons.update(json.loads(line)["reason"] for line in f if line.strip())
    if reasons:
        click.echo("rejected: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common())
                   + f" (see {rejects_path})")
    click.echo(f"wrote {out}/manifest.json")


def check_reject_rate(manifest: dict, max_reject_rate: float) -> None:
    totals = manifest["totals"]
    rate = totals["rejected"] / totals["inputs"] if totals["inputs"] else 0.0
    if rate > max_reject_rate:
        click.echo(f"error: {rate:.2%} of inputs were rejected, above --max-reject-rate "
                   f"{max_reject_rate:.2%}; the shards are written, see rejects.jsonl", err=True)
        sys.exit(1)


class FriendlyGroup(click.Group):
    """A click group that prints ShardifyError and OS errors as one line (exit 2), not a traceback;
    Ctrl-C and SIGTERM stop a command the same way (its workers killed, exit 130)."""

    def invoke(self, ctx):
        try:
            with sigterm_interrupts():
                return super().invoke(ctx)
        except ShardifyError as exc:
            click.echo(f"error: {exc}", err=True)
            _exit(2)
        except OSError as exc:  # unwritable output, full disk, unreadable input: the user's to fix
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            _exit(2)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"{what}: rerun the same command to resume", err=True)
            _exit(130)


def _exit(code: int) -> None:
    exit_if_stuck(code)  # a worker pool stopped by force may have left a thread exit would wait for
    sys.exit(code)


def leave(code) -> None:
    """End the process with `code`, skipping the interpreter's teardown when nothing needs it.

    Freeing the planned split, the modules and the rest at exit took 30-40 ms after every job
    (measured, 10,000 inputs): time that no number of workers can share. Every file shardify
    writes is closed (and renamed into place) before its command returns, so the teardown has
    nothing to finish, unless another thread or a child process is still running: then (or
    for an exit code that is not a number) the normal exit runs, which waits for them."""
    import threading

    mp = sys.modules.get("multiprocessing")
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not isinstance(code, int) or others or (mp is not None and mp.active_children()):
        raise SystemExit(code)
    try:
        exit_now(code)
    except (OSError, ValueError):  # flushing to a closed pipe: let the normal exit report it
        raise SystemExit(code) from None
