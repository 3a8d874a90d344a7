"""The `shardify` command line: thin click commands that parse options and call one function each.

This package holds the command line and nothing else: the group and the commands below here,
the options every job shares in common.py, a command per module for the bigger families.

    shardify imagenet --out DIR [--split S] [--source DIR | --revision REV]   write ImageNet shards
    shardify openwebtext --out DIR --slices 0-4 [--tokenizer T]   (openwebtext.py)
    shardify pairs DATASET --out DIR                              (pairs.py)
    shardify finalize DIR                       merge the nodes' partial results into manifest.json
    shardify verify DIR [--full]                check a shard directory against its manifest
    shardify inspect DIR [--grid out.png]       summary (and a contact sheet) of a shard directory

Heavy libraries (Pillow, pyarrow, huggingface_hub) are imported only by the code that needs
them, so `shardify --help` and jobs on plain JPEGs start fast. The program's entry is `run`
(it also ends fast, see `common.leave`); `main` is the click group for Python callers.
"""

from __future__ import annotations

import click

from shardify import __version__
from shardify.cli.common import REJECT_RATE, FriendlyGroup, execute, job_options, leave


class _Commands(FriendlyGroup):
    """The group, with the openwebtext and pairs commands imported only when asked for (their
    modules pull in the downloader and the tokenizer's helpers, which an ImageNet job does not
    need: every import is start-up time that a 2-worker run cannot share)."""

    lazy = {"openwebtext": "shardify.cli.openwebtext", "pairs": "shardify.cli.pairs",
            "hf-images": "shardify.cli.hf_images"}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            return getattr(importlib.import_module(self.lazy[name]), name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardify")
def main():
    """Turn datasets on the Hugging Face hub (or local copies) into verified WebDataset shards."""


def run() -> None:
    """The `shardify` program (its console script and `python -m shardify`): `main` on the
    command line, then the process ends through `leave`. Python callers use `main` (click's
    usual exit, which a notebook survives)."""
    try:
        main()
    except SystemExit as exc:  # click's standalone mode always ends with one
        leave(exc.code)
    leave(0)


@main.command()
@job_options
@click.option("--split", "splits", multiple=True,
              help="Split to write (repeatable): train, validation, test. Default: train and validation.")
@click.option("--layout", type=click.Choice(["archives", "parquet", "wds", "imagefolder"]), default=None,
              help="Force a source layout instead of recognising it from the file list.")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="Reject images with more pixels than this (decompression bombs). Default 89,478,485.")
def imagenet(out, job, max_reject_rate, source_dir, revision, splits, layout, max_pixels):
    """ImageNet-1k (ILSVRC/imagenet-1k) to shards: jpg (GPU-decodable), cls, json."""
    from shardify.images import DEFAULT_MAX_PIXELS
    from shardify.sources.imagenet import HUB_ID, ImageNetSource
    from shardify.storage import hub_location, local_location

    location = local_location(source_dir) if source_dir else hub_location(HUB_ID, revision)
    source = ImageNetSource(location, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, layout=layout)
    chosen = list(splits) or [s for s in ("train", "validation") if s in source.splits()]
    execute(source, out, chosen, job, max_reject_rate)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--max-reject-rate", default=0.01, show_default=True, type=REJECT_RATE)
def finalize(directory, max_reject_rate):
    """Merge the shards written by all nodes into manifest.json, checking nothing is missing or doubled."""
    from shardify.cli.common import check_reject_rate, report
    from shardify.manifest import finalize as finalize_dir

    manifest = finalize_dir(directory)
    report(manifest, directory)
    check_reject_rate(manifest, max_reject_rate)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--full", is_flag=True, help="Decode every sample, not a sample of them.")
@click.option("--sample-per-shard", default=4, show_default=True, type=click.IntRange(min=0),
              help="Samples decoded per shard without --full.")
@click.option("--no-progress", is_flag=True)
def verify(directory, full, sample_per_shard, no_progress):
    """Recompute checksums and counts, check tar structure and keys, decode images. Exit 1 on problems."""
    from shardify.verify import verify as verify_dir

    problems = verify_dir(directory, full=full, sample_per_shard=sample_per_shard, progress=not no_progress)
    if problems:
        click.echo(f"{directory}: {len(problems)} problem(s):")
        for p in problems:
            click.echo(f"  - {p}")
        raise SystemExit(1)
    click.echo(f"{directory}: OK")


@main.command(name="inspect")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Write a contact sheet PNG here.")
@click.option("--split", default=None, help="Split for the contact sheet (default: the first).")
@click.option("-n", "count", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images in the contact sheet.")
def inspect_(directory, grid, split, count):
    """Summarise a shard directory: splits, samples, bytes, classes, rejects."""
    from shardify.cli.inspect_cmd import contact_sheet, summary

    click.echo(summary(directory))
    if grid:
        n = contact_sheet(directory, grid, n=count, split=split)
        click.echo(f"wrote {grid} ({n} images)")


if __name__ == "__main__":
    main()
