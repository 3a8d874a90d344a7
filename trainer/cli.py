"""`trainer` command line: thin commands that parse options and call importable functions.

    trainer train CONFIG [key=value ...]        e.g. resume=auto, out_dir=runs/x, optim.lr=1e-3
    trainer make-demo-teacher OUT.pt [--dim 64 --depth 4 --heads 4 --patch 8 --img-size 32]

User mistakes (bad config key, bad path, missing checkpoint, NaN loss) print one line
`error: ...` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from trainer.errors import UserError


def train(config_path: str, overrides: list[str]) -> None:
    """Parse, build, train, close."""
    from trainer.config import load_config
    from trainer.loop import Trainer

    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


@click.group()
def cli() -> None:
    """Streaming knowledge-distillation trainer."""


@cli.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("config", type=str)
@click.argument("overrides", nargs=-1, type=str)
def train_cmd(config: str, overrides: tuple[str, ...]) -> None:
    """Train with CONFIG (YAML) and key=value overrides (resume=auto to continue a run)."""
    train(config, list(overrides))


@cli.command("make-demo-teacher")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dim", default=64, show_default=True, help="embedding width (divisible by 4 and heads)")
@click.option("--depth", default=4, show_default=True, help="number of blocks")
@click.option("--heads", default=4, show_default=True, help="attention heads")
@click.option("--patch", default=8, show_default=True, help="patch size in pixels")
@click.option("--img-size", default=32, show_default=True, help="image side in pixels")
@click.option("--seed", default=0, show_default=True, help="seed of the random initialisation")
def make_demo_teacher(out: str, dim: int, depth: int, heads: int, patch: int, img_size: int, seed: int) -> None:
    """Write a small random Data2Vec2 image model in the fairseq checkpoint layout to OUT."""
    from trainer.models.vit import ViTShape, write_fairseq_checkpoint

    if dim % heads or dim % 4 or img_size % patch:
        raise UserError("need dim divisible by heads and by 4, and img-size divisible by patch")
    try:
        path = write_fairseq_checkpoint(out, ViTShape(img_size, patch, dim, depth, heads), seed=seed)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    click.echo(f"wrote {path}")


from trainer.eval.cli import eval_group  # noqa: E402  (click only; models load when a command runs)
from trainer.report import report_command  # noqa: E402

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
