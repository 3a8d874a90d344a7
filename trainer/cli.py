"""`trainer` command line: thin commands that parse options and call importable functions.

    trainer train CONFIG [key=value ...] [--dry-run]   e.g. resume=auto, out_dir=runs/x, optim.lr=1e-3
    trainer export RUN_DIR|CHECKPOINT --out student.pt [--which best|last]
    trainer make-demo-teacher OUT.pt [--kind data2vec2|beitv2 --dim 64 --depth 4 --heads 4 --patch 8 --img-size 32]

User mistakes (bad config key, bad path, missing checkpoint, NaN loss) print one line
`error: ...` and exit with status 2; anything else is a bug and keeps its traceback. A training
run stopped by SIGTERM, SIGUSR1 or SIGINT writes a checkpoint and exits with status 75.
"""

from __future__ import annotations

import sys

import click

from trainer.errors import UserError
from trainer.eval.cli import eval_group  # click only: models load when a command runs
from trainer.report import report_command


def train(config_path: str, overrides: list[str], loader_factory=None) -> None:
    """Parse, build, train, close. `loader_factory` replaces trainer.data.build_loader.

    SIGTERM/SIGUSR1/SIGINT from here on stop the run at the next step boundary with a
    checkpoint, and the process exits with STOPPED_EXIT_CODE (trainer/signals.py)."""
    import os

    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.signals import STOPPED_EXIT_CODE, GracefulStop, die_with_parent, launched_by_torchrun

    stop = GracefulStop(verbose=os.environ.get("RANK", "0") == "0").install()
    if launched_by_torchrun():
        die_with_parent()  # torchrun gone (e.g. killed by a signal it does not forward): stop too
    try:
        cfg = load_config(config_path, overrides)
        trainer = Trainer(cfg, loader_factory=loader_factory, stop=stop)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        stop.restore()  # the caller's handlers again (tests call this in-process)
    code = STOPPED_EXIT_CODE if trainer.stopped else 0
    if trainer.world_size > 1:
        exit_without_teardown(code)
    if code:
        sys.exit(code)


def exit_without_teardown(code: int = 0) -> None:
    """End a finished (or stopped) multi-process run here with status `code`, skipping
    interpreter teardown.

    Every rank has passed the final barrier, the checkpoint and logs are closed and the process
    group is destroyed. But torch's gloo group stays alive after `destroy_process_group` once a
    DistributedDataParallel was built (references held in C++: its worker threads are still
    running here), so it is torn down only in the interpreter's and the C++ runtime's exit
    sequence. There a rank aborted once (SIGABRT, "terminate called without an active
    exception") after a run that had done all its work, and torchrun reported the job failed.
    Nothing is left to tear down, so leave without that sequence."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolved_config_yaml(config_path: str, overrides: list[str]) -> str:
    """The resolved, checked config as YAML after the run's pre-flight (every input file and the
    kind of every manifest, trainer/preflight.py) and its resume decision and check
    (trainer/resume_check.py): no model is built, no shard is read, nothing is written."""
    from trainer.config import config_text, load_config
    from trainer.preflight import preflight
    from trainer.resume_check import dry_run_resume

    cfg = load_config(config_path, overrides)
    checked = preflight(cfg)
    click.echo(f"pre-flight: {len(checked.manifests)} manifest(s) of the right kind, every input file present",
               err=True)
    dry_run_resume(cfg, checked, lambda msg: click.echo(msg, err=True))  # would the run resume, and from where
    return config_text(cfg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Streaming knowledge-distillation trainer: train a student, export it, evaluate it."""


@cli.command("train", context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("config", type=str)
@click.argument("overrides", nargs=-1, type=str)
@click.option("--dry-run", is_flag=True,
              help="resolve and check the whole config and every input file (the pre-flight), print it, and stop")
def train_cmd(config: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train with CONFIG (YAML) and key=value overrides (resume=auto to continue a run).

    The resolved config is saved as <out_dir>/config.yaml; `trainer train <out_dir>/config.yaml
    resume=auto` continues that run."""
    if dry_run:
        click.echo(resolved_config_yaml(config, list(overrides)), nl=False)
        return
    train(config, list(overrides))


@cli.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=str)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="file to write (e.g. student.pt)")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="for a run directory: the best validated checkpoint (else the latest), or the latest")
def export_cmd(source: str, out: str, which: str) -> None:
    """Write the student of a run directory or checkpoint alone (weights + what rebuilds it)."""
    from trainer.export import export_student

    path, record = export_student(source, out, which)
    n = sum(v.numel() for v in record["state_dict"].values())
    click.echo(f"wrote {path}: task {record['task']}, step {record['step']}, {n:,} weights, from {record['source']}")


@cli.command("make-demo-teacher", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dim", default=64, show_default=True, help="embedding width (divisible by 4 and heads)")
@click.option("--depth", default=4, show_default=True, help="number of blocks")
@click.option("--heads", default=4, show_default=True, help="attention heads")
@click.option("--patch", default=8, show_default=True, help="patch size in pixels")
@click.option("--img-size", default=32, show_default=True, help="image side in pixels")
@click.option("--seed", default=0, show_default=True, help="seed of the random initialisation")
@click.option("--kind", type=click.Choice(["data2vec2", "beitv2"]), default="data2vec2", show_default=True,
              help="data2vec2: fairseq layout; beitv2: the original BEiTv2 layout (multimodal teacher)")
def make_demo_teacher(out: str, dim: int, depth: int, heads: int, patch: int, img_size: int, seed: int,
                      kind: str) -> None:
    """Write a small random image model in its original checkpoint layout to OUT."""
    from trainer.models.beitv2 import write_demo_beitv2
    from trainer.models.vit import ViTShape, write_fairseq_checkpoint

    if dim % heads or dim % 4 or img_size % patch:
        raise UserError("need dim divisible by heads and by 4, and img-size divisible by patch")
    try:
        if kind == "beitv2":
            path = write_demo_beitv2(out, img_size, patch, dim, depth, heads, seed=seed)
        else:
            path = write_fairseq_checkpoint(out, ViTShape(img_size, patch, dim, depth, heads), seed=seed)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    click.echo(f"wrote {path}")


cli.add_command(eval_group)
cli.add_command(report_command)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
