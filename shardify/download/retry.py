"""After a URL-list job: the download summary, and `--retry-failed` (which shards to rewrite).

A row rejected for a download reason (shardify/download/fetcher.py: `http_404`, `timeout`, ...) may
succeed on a later run; its shard is made unfinished so that the rerun writes it again. Rows
whose URL can never be fetched (`bad_scheme`: `file:`, `ftp:`, ...; `bad_url`: malformed) are
not retryable: a rerun would give the same answer, so their shards are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from shardify import state
from shardify.download.fetcher import is_download_reason

NOT_RETRYABLE = {"bad_scheme", "bad_url"}


def is_retryable(reason: str) -> bool:
    """A download failure that another attempt might turn into an image."""
    return is_download_reason(reason) and reason not in NOT_RETRYABLE


def prepare_retry(out_dir, num_nodes: int = 1, node_rank: int = 0) -> list[str]:
    """Make this node's shards that hold retryable download rejects unfinished, so that a rerun
    rewrites them (only this node's: another node must never lose a shard it already rewrote).

    Returns their names. The manifest goes too (it no longer describes the directory until the
    rerun finalizes again). Shards without such failures are kept as they are.
    """
    out = Path(out_dir)
    names = []
    for stats_path in sorted(state.stats_dir(out).glob("*.json")):
        stats = state.read_json(stats_path)
        if stats["index"] % num_nodes != node_rank:
            continue
        if any(is_retryable(r["reason"]) for r in stats.get("rejects", [])):
            stem = stats["name"][: -len(".tar")]
            (out / f"{stem}.tar").unlink(missing_ok=True)  # first: the shard is no longer done
            (out / f"{stem}.idx").unlink(missing_ok=True)
            stats_path.unlink()
            names.append(stats["name"])
    if names:
        (out / "manifest.json").unlink(missing_ok=True)
    return names


def download_summary(out_dir) -> str | None:
    """'downloaded 812 of 1000 (81.2%); top errors: http_404 120, timeout 40, ...' or None."""
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    totals = manifest["totals"]
    reasons: dict[str, int] = {}
    rejects_path = out / "rejects.jsonl"
    if rejects_path.exists():
        for line in rejects_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)["reason"]
                reasons[r] = reasons.get(r, 0) + 1
    rate = totals["samples"] / totals["inputs"] if totals["inputs"] else 0.0
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    retryable = sum(n for r, n in reasons.items() if is_retryable(r))
    text = f"downloaded and written {totals['samples']} of {totals['inputs']} URLs ({rate:.1%})"
    if top:
        text += "; top errors: " + ", ".join(f"{r} {n}" for r, n in top)
    if retryable:
        text += f"; {retryable} download failures can be retried with --retry-failed"
    return text
