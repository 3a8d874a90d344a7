"""`shardify hf-images REPO`: an image-classification dataset in the hub's parquet layout to shards.

    shardify hf-images uoft-cs/cifar10 --out shards/cifar10
    shardify hf-images uoft-cs/cifar100 --label-column fine_label --out shards/cifar100
    shardify hf-images uoft-cs/cifar10 --source /data/cifar10 --out shards/cifar10   (a local copy)

Same contract, rejects, resume and verify as `shardify imagenet` (shardify/sources/hf_images.py).
"""

from __future__ import annotations

import click

from shardify.cli.common import execute, job_options


@click.command("hf-images")
@click.argument("repo")
@job_options
@click.option("--image-column", default="img", show_default=True, help="the column holding the image")
@click.option("--label-column", default="label", show_default=True,
              help="the integer class column (CIFAR-100: fine_label or coarse_label)")
@click.option("--name", default=None, help="dataset name in the manifest [default: the repo's name, e.g. cifar10]")
@click.option("--split", "splits", multiple=True, help="Split to write (repeatable). Default: every split found.")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="Reject images with more pixels than this (decompression bombs). Default 89,478,485.")
def hf_images(repo, out, job, max_reject_rate, source_dir, revision, image_column, label_column, name, splits,
              max_pixels):
    """An image-classification dataset on the hub in parquet layout (REPO, e.g. uoft-cs/cifar10) to shards:
    jpg, cls, json."""
    from shardify.format import ShardifyError
    from shardify.images import DEFAULT_MAX_PIXELS
    from shardify.sources.hf_images import HFImagesSource
    from shardify.storage import hub_location, local_location

    location = local_location(source_dir, repo_id=repo) if source_dir else hub_location(repo, revision)
    source = HFImagesSource(location, repo, image_column, label_column, name, max_pixels or DEFAULT_MAX_PIXELS)
    unknown = [s for s in splits if s not in source.splits()]
    if unknown:
        raise ShardifyError(f"no {unknown[0]} split in {repo} (has: {', '.join(source.splits()) or 'none'})")
    execute(source, out, list(splits) or source.splits(), job, max_reject_rate)


# the name the lazy command group in shardify/cli.py looks up
globals()["hf-images"] = hf_images
