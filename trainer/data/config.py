"""Configuration of the streaming data path (trainer.data): what to read and how to augment.

One small dataclass per concern; the trainer's YAML `data:` section loads into `DataConfig`.
Every field is documented where it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.fields import between, choice


@dataclass
class AugmentConfig:
    """Per-sample image augmentation (train) or the fixed validation transform."""

    size: int = field(default=224, metadata=between(8))  # output side in pixels (square)
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (0.9-1.0 multimodal)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = field(default=0.5, metadata=between(0.0, 1.0))  # probability of a horizontal flip
    # brightness/contrast/saturation strength; 0 disables
    color_jitter: float = field(default=0.0, metadata=between(0.0, 1.0))
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet mean, RGB
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet std, RGB
    # "bilinear" or "bicubic" (the reference used bicubic)
    interpolation: str = field(default="bilinear", metadata=choice("bilinear", "bicubic"))
    train: bool = True  # False: validation transform (resize whole image to size x size)
    # CPU path only: "exact" decodes at full scale; "dct" decodes at 1/2, 1/4 or 1/8 scale in the
    # JPEG's DCT domain when the crop is at least 2x (4x, 8x) the output on both sides, then
    # resizes. exact is the default: on the crops it changes, dct differs from exact by more
    # than bilinear differs from bicubic (measured, docs/loader.md)
    decode_scale: str = field(default="exact", metadata=choice("dct", "exact"))


@dataclass
class DataConfig:
    """Which shards to stream and how to batch them."""

    manifests: list[str] = field(default_factory=list)  # manifest.json paths (or their dirs)
    weights: list[float] = field(default_factory=list)  # mixing weights, one per manifest; empty = by size
    split: str = "train"  # split name inside each manifest
    val_split: str = ""  # split validated every validation.every_steps (e.g. "validation"); "": none
    batch_size: int = field(default=256, metadata=between(1))  # per rank
    # DataLoader worker processes per rank (0 = in the main process)
    num_workers: int = field(default=4, metadata=between(0))
    seed: int = 0  # seeds the epoch order and every per-sample random draw
    # bounded shuffle window (samples) applied within the epoch order
    shuffle_buffer: int = field(default=2000, metadata=between(1))
    # "drop" the last partial global batch, or "pad" with marked repeats
    remainder: str = field(default="drop", metadata=choice("drop", "pad"))
    # "cpu", "cuda" or "auto" (cuda when available)
    decode_device: str = field(default="auto", metadata=choice("auto", "cpu", "cuda"))
    # "float32" or "bfloat16" for image tensors
    output_dtype: str = field(default="float32", metadata=choice("float32", "bfloat16"))
    text_max_len: int = field(default=64, metadata=between(2))  # caption length in tokens (padded) for image-text data
    tokenizer: str = ""  # tokenizer.json / vocab.txt path or directory, for on-the-fly text tokenisation
    # OpenWebText block length in tokens, incl. [CLS] and [SEP]
    block_size: int = field(default=256, metadata=between(3))
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the (student's) view
    # image_text only: a second, independently augmented view of every image for the teacher
    # (batch key image_teacher), cut from the same decoded image with its own per-sample draws;
    # augment.train (the validation switch) applies to both views
    teacher_view: bool = False
    teacher_augment: AugmentConfig = field(default_factory=AugmentConfig)  # the teacher's view, when teacher_view
