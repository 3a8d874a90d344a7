"""`shardify pairs DATASET`: image-text pair datasets to shards (jpg + txt + json per pair).

    shardify pairs coco-karpathy --source DIR --out shards/coco --split train
    shardify pairs cc3m --out shards/cc3m --split train            (pixparse/cc3m-wds)
    shardify pairs flickr30k --out shards/flickr30k --split test   (nlphuji/flickr30k)
    shardify pairs urls --source list.parquet --url-col URL --caption-col TEXT --out shards/mine
    shardify pairs conceptual_captions --out shards/cc3m-urls --split train [--retry-failed]
"""

from __future__ import annotations

import os

import click

from shardify.cli.common import FiniteFloatRange, check_reject_rate, job_options, report
from shardify.download.fetcher import DownloadConfig, check_lookahead
from shardify.images import DEFAULT_MAX_PIXELS
from shardify.sources.pairs import DATASETS

_D = DownloadConfig()


def file_or_dir_location(path: str):
    """A Location for a local directory, or for a single list file (its folder, that file only)."""
    from shardify.storage import local_file_location, local_location

    if os.path.isfile(path):
        return local_file_location(path)
    return local_location(path)


def pairs_source(dataset: str, source_dir=None, revision=None, repo=None, image=None, download=None,
                 url_col=None, caption_col=None, subset=None):
    """Build the source of a pair dataset from a local copy or its hub repo."""
    from shardify.format import ShardifyError
    from shardify.sources.pairs import ImageOptions, source_class
    from shardify.storage import hub_location

    cls = source_class(dataset)
    if source_dir:
        loc = file_or_dir_location(source_dir)
    else:
        repo_id = repo or cls.hub_id
        if not repo_id:
            raise ShardifyError(f"{dataset} has no default hub repo: pass --source DIR with a local copy "
                                f"or --repo ID of a dataset repo in the same layout (docs/datasets/)")
        loc = hub_location(repo_id, revision)
    kwargs = {"image": image or ImageOptions()}
    if dataset in ("urls", "conceptual_captions", "sbu"):
        kwargs.update(download=download or DownloadConfig(), url_col=url_col, caption_col=caption_col,
                      subset=subset)
    elif url_col or caption_col or subset:
        raise ShardifyError("--url-col, --caption-col and --subset apply to URL lists only")
    return cls(loc, **kwargs)


def run_pairs(source, out, splits, job, max_reject_rate, retry_failed=False, echo=click.echo):
    """Run (or resume, or retry) a pairs job; print the reconciliation and, for URL lists, the
    download summary. Returns the manifest (None on a node of a multi-node job)."""
    from shardify.download.retry import download_summary, prepare_retry
    from shardify.job import run_job

    if retry_failed:
        redo = prepare_retry(out, job.num_nodes, job.node_rank)
        echo(f"--retry-failed: rewriting {len(redo)} shard(s) with download failures")
    manifest = run_job(source, out, splits, job)
    if manifest is None:
        return None
    report(manifest, out)
    if source.dataset in ("urls", "conceptual_captions", "sbu"):
        echo(download_summary(out))
    check_reject_rate(manifest, max_reject_rate)
    return manifest


@click.command("pairs")
@click.argument("dataset", type=click.Choice(list(DATASETS)))
@job_options
@click.option("--split", "splits", multiple=True, help="Split to write (repeatable). Default: all of them.")
@click.option("--repo", default=None, help="Hub dataset repo to read instead of the dataset's default.")
@click.option("--max-side", default=None, type=click.IntRange(min=16),
              help="Downscale images whose longer side is above this (re-encodes those). Default: keep.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Reject images with more pixels (decompression bombs).")
@click.option("--min-side", default=10, show_default=True, type=click.IntRange(min=1),
              help="Reject images whose shorter side is below this (placeholders such as 1x1 pixels).")
@click.option("--url-col", default=None, help="URL lists: the url column (default per dataset).")
@click.option("--caption-col", default=None, help="URL lists: the caption column (default caption).")
@click.option("--subset", default=None, help="URL lists: only files under this folder of the repo.")
@click.option("--retry-failed", is_flag=True,
              help="URL lists: rewrite the shards that had download failures (404s, timeouts, ...).")
@click.option("--timeout", default=_D.timeout, show_default=True, type=FiniteFloatRange(min=0.1),
              help="Seconds per download attempt, connect to last byte.")
@click.option("--retries", default=_D.retries, show_default=True, type=click.IntRange(min=0),
              help="Retries after a transient failure (429, 5xx, timeout, reset).")
@click.option("--backoff", default=_D.backoff, show_default=True, type=FiniteFloatRange(min=0),
              help="First wait before a retry, in seconds; doubles each time.")
@click.option("--concurrency", default=_D.concurrency, show_default=True, type=click.IntRange(min=1),
              help="Requests in flight per worker process (plus the one the writer waits for).")
@click.option("--host-rate", default=_D.host_rate, show_default=True, type=FiniteFloatRange(min=0),
              help="Requests per second per host per worker (0: unlimited).")
@click.option("--max-bytes", default=_D.max_bytes, show_default=True, type=click.IntRange(min=1),
              help="Largest image body accepted, after any decompression.")
@click.option("--max-redirects", default=_D.max_redirects, show_default=True, type=click.IntRange(min=0))
@click.option("--lookahead-mb", default=_D.lookahead_bytes // 1_000_000, show_default=True,
              type=click.IntRange(min=1),
              help="MB of images each worker may download ahead of a slow URL while keeping the order.")
def pairs(dataset, out, job, max_reject_rate, source_dir, revision, splits, repo, max_side, max_pixels,
          min_side, url_col, caption_col, subset, retry_failed, timeout, retries, backoff, concurrency,
          host_rate, max_bytes, max_redirects, lookahead_mb):
    """Image-text pairs to shards: jpg (GPU-decodable), txt (caption), json (image id, url, size)."""
    from shardify.sources.pairs import ImageOptions

    is_urls = dataset in ("urls", "conceptual_captions", "sbu")
    ctx = click.get_current_context()
    if is_urls and ctx.get_parameter_source("max_reject_rate") == click.core.ParameterSource.DEFAULT:
        max_reject_rate = 1.0  # dead links are normal in URL lists; the summary reports the rate
    download = DownloadConfig(timeout=timeout, retries=retries, backoff=backoff, concurrency=concurrency,
                              host_rate=host_rate, max_bytes=max_bytes, max_redirects=max_redirects,
                              lookahead_bytes=lookahead_mb * 1_000_000)
    if is_urls:
        check_lookahead(download.lookahead_bytes, job.workers)
    source = pairs_source(dataset, source_dir, revision, repo,
                          ImageOptions(max_side=max_side, max_pixels=max_pixels, min_side=min_side),
                          download, url_col, caption_col, subset)
    chosen = list(splits) or source.splits()
    if retry_failed and not is_urls:
        click.echo("note: --retry-failed only matters for URL lists", err=True)
    run_pairs(source, out, chosen, job, max_reject_rate, retry_failed=retry_failed and is_urls)
