"""A toy evaluation written by following docs/extending.md ("An evaluation"): a metric (nearest
class centroid on mean-colour features), its one registry entry, and a `run_` function that
reads real shards and writes the record through `write_result`."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.eval.results import Evaluation, manifest_record, write_result

# step 2 of the checklist: the one registry line
TOY = Evaluation("toy_centroid", "toy: nearest class centroid", (("top1", "top-1"),), protocol="toy-protocol",
                 thesis={"imagenet": {"model": "Toy", "setting": "toy figure", "split": "validation",
                                      "metrics": {"top1": 50.0}}})


def register(evaluations: dict) -> None:
    evaluations[TOY.name] = TOY


# step 1: the metric
def nearest_centroid_predictions(train_ND: np.ndarray, train_y: np.ndarray, val_ND: np.ndarray) -> np.ndarray:
    classes = np.unique(train_y)
    centroids = np.stack([train_ND[train_y == c].mean(0) for c in classes])
    dist = ((val_ND[:, None, :] - centroids[None]) ** 2).sum(-1)
    return classes[dist.argmin(1)]


def mean_colour_features(shards: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            img = np.asarray(Image.open(io.BytesIO(members[name])).convert("RGB"), dtype=np.float64)
            feats.append(img.reshape(-1, 3).mean(0))
            labels.append(int(members[name[:-3] + "cls"]))
    return np.stack(feats), np.array(labels)


# step 3: the run function that writes the record
def run_toy(shards: Path, out: Path, protocol: str = TOY.protocol) -> dict:
    train_x, train_y = mean_colour_features(shards, "train")
    val_x, val_y = mean_colour_features(shards, "validation")
    pred = nearest_centroid_predictions(train_x, train_y, val_x)
    metrics = {"top1": 100.0 * float((pred == val_y).mean())}
    data = {"train": manifest_record(str(shards), "train"), "validation": manifest_record(str(shards), "validation")}
    return write_result(out, TOY.name, "imagenet", metrics, {"kind": "student", "task": "toy", "source": "toy"},
                        {}, data, {}, 0.0, protocol)
