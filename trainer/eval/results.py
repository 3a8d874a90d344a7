"""The one record every evaluation writes, and the registry of evaluations that reads it back.

One JSON file per run, written atomically:

    {"kind": "shardify-kd-eval", "version": 2, "benchmark": "finetune", "dataset": "cifar10",
     "protocol": "thesis-finetune", "metrics": {...}, "model": {"kind", "task", "source", "sha256", "step"},
     "config": {...}, "data": {"train": {manifest record}, "validation": {...}}, "options": {...},
     "created": "...Z", "seconds": 12.3}

A manifest record is the manifest itself without its per-shard lists, plus the path, the split
used and the SHA-256 of the manifest file (which pins every shard's own SHA-256), so a figure
can always be traced to the exact bytes it was measured on. `metrics["chance"]` (when present)
holds what a random guess scores on each shown metric.

`EVALUATIONS` names every evaluation: the metric keys the report shows (dotted paths into
`metrics`), the protocol under which the thesis measured it, and the thesis figures per dataset.
`trainer report` sets a record beside a thesis figure only when its `protocol` is the thesis's
(an evaluation records a different protocol name as soon as one recipe value differs). A new
evaluation is its metric module plus one entry here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .features import manifest_path, read_manifest

KIND, VERSION = "shardify-kd-eval", 2

_RETRIEVAL = (("i2t_R@1", "text R@1"), ("i2t_R@5", "text R@5"), ("i2t_R@10", "text R@10"),
              ("t2i_R@1", "image R@1"), ("t2i_R@5", "image R@5"), ("t2i_R@10", "image R@10"))


def _recall(figures: tuple[float, ...]) -> dict[str, float]:
    return dict(zip([k for k, _ in _RETRIEVAL], figures))


@dataclass(frozen=True)
class Combined:
    """A figure over several datasets of one evaluation (the GLUE score): the mean of `metric`."""
    label: str
    members: tuple[str, ...]
    metric: str = "score"


@dataclass(frozen=True)
class Evaluation:
    name: str  # the record's `benchmark`
    title: str
    metrics: tuple[tuple[str, str], ...]  # (dotted key into record["metrics"], column label)
    protocol: str  # the protocol the thesis measured its figures with
    thesis: dict[str, dict] = field(default_factory=dict)  # dataset -> {model, setting, split, metrics}
    combined: Combined | None = None
    # the student-vs-teacher sentence of the report: metric keys (the first with the ratio), and
    # the words that open it
    compare: tuple[str, ...] = ()
    short: str = ""


_GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
# F-DistilBERT's per-task dev figures (thesis, GLUE table); their mean is the GLUE score 76.9
_GLUE_FIGURES = {"mnli": 81.2, "qnli": 88.0, "rte": 67.64, "mrpc": 85.0, "qqp": 86.5, "stsb": 81.0,
                 "cola": 55.1, "sst2": 91.4, "wnli": 56.4}


def _image_thesis(figures: dict[str, float]) -> dict[str, dict]:
    names = {"imagenet": ("ImageNet-1k", "validation"), "cifar10": ("CIFAR-10", "test"),
             "cifar100": ("CIFAR-100", "test")}
    return {d: {"model": "DistilData2Vec2", "setting": names[d][0], "split": names[d][1], "metrics": {"top1": v}}
            for d, v in figures.items()}


EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (
    Evaluation("probe", "fast probe (cached features; a health check, not a thesis protocol)",
               (("top1", "top-1"), ("top5", "top-5"), ("knn.top1", "k-NN top-1"), ("knn.top5", "k-NN top-5")),
               protocol="", compare=("top1", "knn.top1"), short="Fast probe"),
    Evaluation("finetune", "image classification, full fine-tuning",
               (("top1", "top-1"), ("top5", "top-5")), protocol="thesis-finetune",
               thesis=_image_thesis({"imagenet": 76.1, "cifar10": 97.7, "cifar100": 87.2})),
    Evaluation("linear", "image classification, linear probe (frozen encoder)",
               (("top1", "top-1"), ("top5", "top-5")), protocol="thesis-linear",
               thesis=_image_thesis({"imagenet": 71.1, "cifar10": 93.2, "cifar100": 77.3})),
    Evaluation("zero_shot", "zero-shot classification", (("top1", "top-1"), ("top5", "top-5")),
               protocol="clip-80-templates-openclip-names",
               thesis={"imagenet": {"model": "S-SMKE", "setting": "ImageNet-1k, 80 CLIP templates",
                                    "split": "validation", "metrics": {"top1": 37.0}}}),
    Evaluation("retrieval", "image-text retrieval, zero-shot", _RETRIEVAL, protocol="zero-shot",
               thesis={"coco-karpathy": {"model": "S-SMKE", "setting": "COCO 5k test, zero-shot", "split": "test",
                                         "metrics": _recall((53.54, 81.1, 89.52, 35.65, 66.0, 77.77))},
                       "flickr30k": {"model": "S-SMKE", "setting": "Flickr30k 1k test, zero-shot", "split": "test",
                                     "metrics": _recall((70.9, 92.1, 96.0, 52.72, 80.2, 87.46))}}),
    Evaluation("retrieval_finetune", "image-text retrieval after fine-tuning on the dataset's train split",
               _RETRIEVAL, protocol="thesis-retrieval-finetune",
               thesis={"coco-karpathy": {"model": "S-SMKE", "setting": "COCO 5k test, fine-tuned", "split": "test",
                                         "metrics": _recall((56.2, 83.3, 91.1, 39.8, 69.2, 79.8))},
                       "flickr30k": {"model": "S-SMKE", "setting": "Flickr30k 1k test, fine-tuned", "split": "test",
                                     "metrics": _recall((82.0, 95.4, 98.0, 64.6, 87.5, 93.1))}}),
    Evaluation("glue", "GLUE, fine-tuned per task (validation)", (("score", "score"),), protocol="thesis-glue",
               thesis={t: {"model": "F-DistilBERT", "setting": f"GLUE {t} dev", "split": "validation",
                           "metrics": {"score": v}} for t, v in _GLUE_FIGURES.items()}
               | {"glue": {"model": "F-DistilBERT", "setting": "GLUE score, 9 tasks (DistilBERT 77.0, BERT 79.5)",
                           "metrics": {"score": 76.9}}},
               combined=Combined("GLUE score (mean over the 9 tasks)", _GLUE_TASKS)),
)}


def evaluation(name: str) -> Evaluation:
    if name not in EVALUATIONS:
        raise KeyError(f"unknown evaluation {name!r} (known: {', '.join(EVALUATIONS)})")
    return EVALUATIONS[name]


def thesis_figure(benchmark: str, dataset: str, split: str | None, protocol: str | None) -> dict | None:
    """The thesis's entry for a result, or None unless the benchmark, the dataset, the split (when
    the entry names one) and the protocol all match."""
    ev = EVALUATIONS.get(benchmark)
    entry = ev.thesis.get(dataset) if ev else None
    if not entry or not ev.protocol or protocol != ev.protocol:
        return None
    if split is not None and entry.get("split", split) != split:
        return None
    return entry


def protocol_name(thesis_protocol: str, recipe: dict, used: dict) -> str:
    """`thesis_protocol` when every recipe value was used as the thesis set it, else a name that
    lists what changed (such a result is never set beside a thesis figure)."""
    changed = sorted(k for k, v in recipe.items() if used.get(k) != v)
    return thesis_protocol if not changed else f"custom ({thesis_protocol} with {', '.join(changed)} changed)"


def manifest_record(shards: str, split: str) -> dict:
    doc, sha = read_manifest(shards)
    splits = {name: {k: v for k, v in s.items() if k != "shards"} | {"shards": len(s.get("shards", []))}
              for name, s in (doc.get("splits") or {}).items()}
    slim = {k: v for k, v in doc.items() if k not in ("splits", "classes", "class_names")}
    slim["classes"] = len(doc.get("classes") or [])
    return {"path": os.path.abspath(manifest_path(shards)), "split": split, "sha256": sha,
            "manifest": slim | {"splits": splits}}


def write_result(out: str | Path, benchmark: str, dataset: str, metrics: dict, model: dict, config: dict,
                 data: dict, options: dict, seconds: float, protocol: str) -> dict:
    """Write one evaluation record atomically; `model` is the evaluated model's description."""
    evaluation(benchmark)  # an unregistered evaluation is a programming error, caught at once
    record = {"kind": KIND, "version": VERSION, "benchmark": benchmark, "dataset": dataset, "protocol": protocol,
              "metrics": metrics, "model": model, "config": config, "data": data,
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


def metric_value(record: dict, key: str):
    """A dotted key ("knn.top1") read from a record's metrics; None when absent."""
    value = record.get("metrics") or {}
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
