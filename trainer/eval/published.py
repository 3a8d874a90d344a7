"""The thesis's published figures, to set an evaluation beside (docs/methods.md lists them).

Keyed by (benchmark, dataset as the shard manifest names it); each entry names the model the
thesis reported, the training task that produces such a student, the split it was measured on
and metric -> figure (%).
"Text retrieval" in the thesis is image -> text (i2t here), "image retrieval" text -> image.
"""

from __future__ import annotations

PUBLISHED: dict[tuple[str, str], dict] = {
    ("linear_probe", "imagenet"): {
        "model": "DistilData2Vec2", "task": "image_kd", "setting": "ImageNet-1k linear probe", "split": "validation",
        "metrics": {"top1": 71.1}},
    ("zero_shot", "imagenet"): {
        "model": "S-SMKE", "task": "multimodal", "setting": "ImageNet-1k, 80 CLIP templates", "split": "validation",
        "metrics": {"top1": 37.0}},
    ("retrieval", "coco-karpathy"): {
        "model": "S-SMKE", "task": "multimodal", "setting": "COCO 5k test, zero-shot", "split": "test",
        "metrics": {"i2t_R@1": 53.54, "i2t_R@5": 81.1, "i2t_R@10": 89.52,
                    "t2i_R@1": 35.65, "t2i_R@5": 66.0, "t2i_R@10": 77.77}},
    ("retrieval", "flickr30k"): {
        "model": "S-SMKE", "task": "multimodal", "setting": "Flickr30k 1k test, zero-shot", "split": "test",
        "metrics": {"i2t_R@1": 70.9, "i2t_R@5": 92.1, "i2t_R@10": 96.0,
                    "t2i_R@1": 52.72, "t2i_R@5": 80.2, "t2i_R@10": 87.46}},
    ("glue", "glue"): {
        "model": "F-DistilBERT", "task": "text_kd", "setting": "GLUE dev score (DistilBERT 77.0, BERT 79.5)",
        "metrics": {"score": 76.9}},
}


def published(benchmark: str, dataset: str, split: str | None = None) -> dict | None:
    """The thesis's entry for a benchmark on a dataset (and, when given, on that split)."""
    entry = PUBLISHED.get((benchmark, dataset))
    if entry and split is not None and entry.get("split", split) != split:
        return None
    return entry
