"""Build the tiny evaluation data sets of `make demo` in the hub's own parquet layouts.

    python scripts/make_demo_eval_data.py DIR

writes
    DIR/cifar10/plain_text/{train,test}-00000-of-00001.parquet   (the layout of `uoft-cs/cifar10`:
                 columns img {bytes, path} (PNG) and label, ClassLabel names in the metadata;
                 200 train / 50 test 32x32 images, each class a colour plus noise)
    DIR/glue/<task>/{train,validation*}-00000-of-00001.parquet    (the layout of `nyu-mll/glue`,
                 all 9 tasks with their columns; 48 train / 16 validation rows whose label a
                 keyword decides, so a few steps can learn it)
Written with the `datasets` library (CIFAR, so its metadata is the hub's) and pyarrow (GLUE).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200),
           (120, 60, 20), (250, 250, 250), (20, 20, 20), (120, 120, 120)]
GLUE = {  # task: (columns, number of labels (1: a score in 0..5), validation split names)
    "cola": (("sentence",), 2, ("validation",)), "sst2": (("sentence",), 2, ("validation",)),
    "mrpc": (("sentence1", "sentence2"), 2, ("validation",)), "qqp": (("question1", "question2"), 2, ("validation",)),
    "stsb": (("sentence1", "sentence2"), 1, ("validation",)),
    "mnli": (("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched")),
    "qnli": (("question", "sentence"), 2, ("validation",)), "rte": (("sentence1", "sentence2"), 2, ("validation",)),
    "wnli": (("sentence1", "sentence2"), 2, ("validation",)),
}
WORDS = ["bad", "good", "neutral"]
NOUNS = ["film", "story", "song", "game", "meal", "trip", "book", "show"]


def cifar(root: Path, n_train: int = 200, n_test: int = 50) -> None:
    import datasets
    from PIL import Image

    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10)})
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, labels = [], []
        for i in range(n):
            y = i % 10
            arr = np.clip(np.array(COLOURS[y]) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            imgs.append({"bytes": buf.getvalue(), "path": None})
            labels.append(y)
        out = root / "cifar10" / "plain_text" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"img": imgs, "label": labels}, features=feats).to_parquet(str(out))


def glue(root: Path, n_train: int = 48, n_val: int = 16) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for task, (columns, labels, val_splits) in GLUE.items():
        for split, n in (("train", n_train), *((s, n_val) for s in val_splits)):
            rows: dict[str, list] = {c: [] for c in columns}
            rows["label"] = []
            for i in range(n):
                y = i % max(labels, 2) if labels > 1 else (i % 6) * 1.0  # STS-B: a score 0..5
                word = WORDS[int(y) % len(WORDS)] if labels > 1 else ("good " * int(y)).strip() or "plain"
                for k, c in enumerate(columns):
                    noun = NOUNS[(i + k) % len(NOUNS)]
                    rows[c].append(f"a {word} {noun} number {i}" if k == 0 else f"the {noun} was {word}")
                rows["label"].append(y)
            rows["idx"] = list(range(n))
            out = root / "glue" / task / f"{split}-00000-of-00001.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(rows), out)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    cifar(root)
    glue(root)
    print(f"wrote {root}/cifar10 (200 train / 50 test images, 10 classes) and {root}/glue (9 tasks)")


if __name__ == "__main__":
    main()
