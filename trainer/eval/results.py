"""The record every evaluation writes: its numbers, the model, the config and the data used.

One JSON file per run, written atomically:

    {"kind": "shardify-kd-eval", "version": 1, "benchmark": "linear_probe", "dataset": "imagenet",
     "metrics": {...}, "model": {"kind", "task", "source", "sha256", "step"}, "config": {...},
     "data": {"train": {manifest record}, "validation": {...}}, "options": {...},
     "created": "...Z", "seconds": 12.3}

A manifest record is the manifest itself without its per-shard lists, plus the path, the split
used and the SHA-256 of the manifest file (which pins every shard's own SHA-256), so a figure
can always be traced to the exact bytes it was measured on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .features import manifest_path, read_manifest

KIND, VERSION = "shardify-kd-eval", 1


def manifest_record(shards: str, split: str) -> dict:
    doc, sha = read_manifest(shards)
    splits = {name: {k: v for k, v in s.items() if k != "shards"} | {"shards": len(s.get("shards", []))}
              for name, s in (doc.get("splits") or {}).items()}
    slim = {k: v for k, v in doc.items() if k not in ("splits", "classes", "class_names")}
    slim["classes"] = len(doc.get("classes") or [])
    return {"path": os.path.abspath(manifest_path(shards)), "split": split, "sha256": sha,
            "manifest": slim | {"splits": splits}}


def write_result(out: str | Path, benchmark: str, dataset: str, metrics: dict, model, data: dict,
                 options: dict, seconds: float) -> dict:
    record = {"kind": KIND, "version": VERSION, "benchmark": benchmark, "dataset": dataset,
              "metrics": metrics, "model": model.describe(), "config": model.config, "data": data,
              "options": options, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(seconds, 2)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    return record


def read_results(directory: str | Path) -> list[dict]:
    """Every evaluation record (by kind) in a directory, sorted by file name."""
    out = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            out.append(doc | {"_file": p.name})
    return out
