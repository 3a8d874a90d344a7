"""`shardify inspect`: a summary of a shard directory, and a contact sheet of its images."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

from shardify.manifest import load_manifest


def summary(out_dir) -> str:
    manifest, root = load_manifest(out_dir)
    src = manifest["source"]
    lines = [
        f"dataset   {manifest['dataset']}  (source {src.get('id')} @ {src.get('revision') or 'local'}, "
        f"layout {src.get('layout')})",
        f"fields    {', '.join(manifest['fields'])}",
        "options   " + ", ".join(f"{k}={v}" for k, v in manifest["options"].items()),
    ]
    for split, info in manifest["splits"].items():
        sizes = [sh["samples"] for sh in info["shards"]] or [0]
        lines.append(f"{split:<9} {info['samples']} samples in {len(info['shards'])} shards "
                     f"({min(sizes)}-{max(sizes)} per shard), {info['bytes'] / 1e6:.1f} MB, "
                     f"{info['rejected']} rejected of {info['inputs']} inputs")
        tokens = info.get("tokens")
        if isinstance(tokens, dict) and "blocks" in tokens:  # pre-tokenised text: how full the blocks are
            share = tokens.get("padding_share")
            lines.append(f"{'':<9} {tokens['blocks']} blocks, {tokens.get('packing', 'stream')} packing, "
                         f"padding {'n/a' if share is None else f'{100 * share:.1f}%'} of the positions")
    if manifest.get("classes"):
        lines.append(f"classes   {len(manifest['classes'])}")
    reasons = collections.Counter()
    rejects = root / "rejects.jsonl"
    if rejects.exists():
        with open(rejects, encoding="utf-8") as f:
            reasons.update(json.loads(line)["reason"] for line in f if line.strip())
    lines.append("rejects   " + (", ".join(f"{r}: {n}" for r, n in reasons.most_common()) or "none"))
    return "\n".join(lines)


def _iter_samples(root: Path, shard_names: list[str]):
    for name in shard_names:
        with tarfile.open(root / name, mode="r:") as tar:
            current, parts = None, {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                if current is not None and key != current:
                    yield current, parts
                    parts = {}
                current = key
                parts[ext] = tar.extractfile(m).read()
            if current is not None:
                yield current, parts


def contact_sheet(out_dir, out_png, n: int = 32, split: str | None = None, thumb: int = 128) -> int:
    """Write a grid of the first n images (spread over shards) with their labels; return count."""
    from PIL import Image, ImageDraw, ImageOps

    manifest, root = load_manifest(out_dir)
    split = split or ("train" if "train" in manifest["splits"] else next(iter(manifest["splits"])))
    if split not in manifest["splits"]:
        from shardify.format import ShardifyError

        raise ShardifyError(f"split {split!r} is not in the manifest (has: {', '.join(manifest['splits'])})")
    names = manifest.get("class_names") or manifest.get("classes") or []
    shards = [sh["name"] for sh in manifest["splits"][split]["shards"]]
    tiles = []
    for key, parts in _iter_samples(root, shards):
        if "jpg" not in parts:
            continue
        img = ImageOps.contain(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"), (thumb, thumb))
        label = key
        if "cls" in parts:
            c = int(parts["cls"])
            label = f"{c} {names[c]}" if c < len(names) else str(c)
        elif "txt" in parts:
            label = parts["txt"].decode("utf-8", "replace")
        tiles.append((img, label[:22]))
        if len(tiles) >= n:
            break
    cols = min(8, max(1, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    cell_h = thumb + 14
    sheet = Image.new("RGB", (cols * thumb, max(1, rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(tiles):
        x, y = (i % cols) * thumb, (i // cols) * cell_h
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x + 2, y + thumb + 1), label, fill="black")
    sheet.save(out_png, format="PNG")  # a PNG whatever the name ends with (or if it has no extension)
    return len(tiles)
