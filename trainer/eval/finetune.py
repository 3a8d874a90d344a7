"""Image classification fine-tuning and linear probing as the thesis ran them (`trainer eval finetune`).

The protocol of `TimCares/MasterThesis:configs/fine_tuning/{imagenet,cifar10,cifar100}.yaml` with
`src/models/image_classification.py` and `src/datasets_/data_utils.py` (get_transforms_finetuning):
- model: the image encoder's last-block tokens, the patch tokens mean-pooled ([CLS] left out),
  a LayerNorm (eps 1e-6) and a linear head (truncated-normal 0.02 init); `--linear` freezes the
  encoder (the linear probe, `linear_classifier: true`), else everything is fine-tuned;
- optimiser: AdamW, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 except on 1-D
  parameters, biases, [CLS] and positions; layer-wise lr decay 0.81 (ImageNet) / 0.75 (CIFAR)
  through timm's `param_groups_layer_decay` (stem decay^(L+1), block i decay^(L-i), head 1);
- schedule: 15 epochs at batch 256, cosine with a linear warmup over the first 10% of the steps
  (transformers' `get_cosine_schedule_with_warmup`, as the thesis);
- augmentation (timm's, as the thesis): `create_transform` with RandAugment `rand-m9-mstd0.5-inc1`,
  bicubic RandomResizedCrop, flip, random erasing 0.25 (pixel mode, one count); Mixup 0.8 / CutMix
  1.0 (prob 0.9, switch 0.5, batch mode) with label smoothing 0.1 (`timm.data.Mixup`); the loss
  is the thesis's `(-target * log_softmax(logits)).mean()` (a mean over batch and classes);
- evaluation: Resize (shorter side) + CenterCrop to the image size, bicubic, ImageNet mean/std;
  top-1/top-5 on the held-out split.
Each run writes one record (trainer/eval/results.py) as benchmark `finetune` or `linear`; any
recipe value changed makes its protocol `custom (...)`.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageRecipe:
    epochs: float = 15
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    layer_decay: float = 0.81
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 0.9
    switch_prob: float = 0.5
    mix_mode: str = "batch"
    label_smoothing: float = 0.1
    image_size: int = 224
    seed: int = 42
    # the length of the cosine schedule in steps, as the thesis's yaml sets it (`optimizer.max_steps`);
    # None: the steps the run takes. Training itself stops after `epochs`, as Lightning's max_epochs did.
    schedule_steps: int | None = None


def thesis_recipe(dataset: str) -> ImageRecipe:
    """The thesis's recipe for a data set: layer decay 0.75 on CIFAR, 0.81 otherwise (ImageNet).
    Its CIFAR yamls set the schedule to 3,525 steps (15 x 235, as for 60,000 images) while 15
    epochs of 50,000 at batch 256 take 2,925: the runs ended at 83% of their cosine, and so do ours."""
    if dataset.lower().startswith("cifar"):
        return ImageRecipe(layer_decay=0.75, schedule_steps=3525)
    return ImageRecipe(layer_decay=0.81, schedule_steps=75060)  # 15 x 5,004 batches of ImageNet-1k


class ImageClassifier(nn.Module):
    """Encoder tokens [B, 1+N, D] -> mean of the patch tokens -> LayerNorm -> linear head."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int, linear: bool = False):
        super().__init__()
        self.encoder = encoder
        self.linear = linear
        if linear:
            encoder.requires_grad_(False)
        self.head_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.linear):
            tokens = self.encoder(img_BCHW)
        return self.head(self.head_norm(tokens[:, 1:].mean(dim=1).float()))

    @staticmethod
    def group_matcher(coarse: bool = False) -> dict:
        """Layer ids for timm's layer decay: the encoder's stem 0, its block i i+1; the head (and
        its norm) unmatched, which timm puts on the top layer (scale 1), as the thesis did."""
        return {"stem": r"^encoder\.(?!(?:.*\.)?blocks\.\d+\.)", "blocks": r"^encoder\.(?:.*\.)?blocks\.(\d+)\."}


def param_groups(model: ImageClassifier, r: ImageRecipe) -> list[dict]:
    """timm's layer-decay groups, each with its own lr (timm leaves `lr_scale` for its own
    schedulers; torch's AdamW and the transformers schedule read `lr`)."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=r.weight_decay, layer_decay=r.layer_decay,
                                      no_weight_decay_list=["*cls_token", "*pos_embed"])
    for g in groups:
        g["lr"] = r.lr * g["lr_scale"]
    return groups


def optimizer_and_schedule(model: ImageClassifier, r: ImageRecipe, total_steps: int):
    from transformers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(param_groups(model, r), lr=r.lr, betas=r.betas, eps=r.eps)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=int(total_steps * r.warmup_frac),
                                            num_training_steps=total_steps)
    return opt, sched


def train_transform(r: ImageRecipe):
    from timm.data import create_transform

    return create_transform(input_size=r.image_size, is_training=True, color_jitter=None,
                            auto_augment=r.auto_augment, interpolation="bicubic", re_prob=r.reprob,
                            re_mode=r.remode, re_count=r.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def mixup(r: ImageRecipe, num_classes: int):
    from timm.data import Mixup

    return Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=r.mix_prob, switch_prob=r.switch_prob,
                 mode=r.mix_mode, label_smoothing=r.label_smoothing, num_classes=num_classes)


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The thesis's loss with Mixup targets: the mean over batch *and* classes of
    -target * log_softmax (so 1/C of the usual soft cross-entropy)."""
    return (-target * F.log_softmax(logits.float(), dim=-1)).mean()


class ShardImages(torch.utils.data.Dataset):
    """Every (image, label) of one split of an image-classification shard directory, decoded with
    PIL and transformed; each worker opens its own shard reader."""

    def __init__(self, shards: str, split: str, transform, limit: int = 0):
        from .features import manifest_path, read_manifest

        doc = read_manifest(shards)[0]
        if split not in (doc.get("splits") or {}):
            raise UserError(f"split {split!r} not in manifest {shards}")
        base = Path(manifest_path(shards)).parent
        self.index = [(str(base / sh["name"]), sh["samples"], i)
                      for sh in doc["splits"][split]["shards"] for i in range(sh["samples"])]
        if limit:
            self.index = self.index[:limit]
        self.transform = transform
        self.classes = len(doc.get("classes") or [])
        self._reader = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        from trainer.data.shards import Corrupt, ShardReader

        if self._reader is None:
            self._reader = ShardReader()
        url, count, j = self.index[i]
        got = self._reader.read(url, count, [j], ("jpg", "cls"))[0]
        if isinstance(got, Corrupt):
            raise UserError(f"{url}: sample {j} unreadable ({got.reason})")
        with Image.open(io.BytesIO(got[1]["jpg"])) as im:
            img = im.convert("RGB")
        return self.transform(img), int(got[1]["cls"].decode().strip())


@dataclass
class FinetuneOptions:
    linear: bool = False
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    layer_decay: float | None = None
    image_size: int | None = None
    seed: int | None = None
    max_train_samples: int = 0
    max_eval_samples: int = 0


def effective_recipe(dataset: str, opts: FinetuneOptions) -> ImageRecipe:
    changes = {k: getattr(opts, k) for k in ("epochs", "batch_size", "lr", "layer_decay", "image_size", "seed")
               if getattr(opts, k) is not None}
    if opts.epochs is not None or opts.batch_size is not None or opts.max_train_samples:
        changes["schedule_steps"] = None  # the thesis's step count belongs to its data and batch
    return replace(thesis_recipe(dataset), **changes)


def _loader(ds, batch: int, shuffle: bool, workers: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, drop_last=shuffle, num_workers=workers,
                                       generator=gen, persistent_workers=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict:
    from .metrics import topk_accuracy

    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


def train_classifier(model: ImageClassifier, train_ds, val_ds, r: ImageRecipe, num_classes: int,
                     device: torch.device, workers: int, log=print) -> tuple[dict, list[dict], int]:
    """Fine-tune (or probe); returns the final validation metrics, the per-epoch history and the steps."""
    batch = min(r.batch_size, len(train_ds) - len(train_ds) % 2)  # Mixup needs an even batch
    if batch < 2:
        raise UserError("fine-tuning needs at least 2 training images")
    steps_per_epoch = len(train_ds) // batch  # the thesis drops the last partial batch
    total = max(1, math.ceil(steps_per_epoch * r.epochs))
    torch.manual_seed(r.seed)
    opt, sched = optimizer_and_schedule(model, r, r.schedule_steps or total)
    mix = mixup(r, num_classes)
    train_dl = _loader(train_ds, batch, True, workers, r.seed)
    val_dl = _loader(val_ds, max(batch, 2), False, workers, r.seed)
    step, history = 0, []
    while step < total:
        model.train()
        if model.linear:
            model.encoder.eval()  # a frozen encoder: no dropout, no drop path
        losses = []
        for x, y in train_dl:
            if step >= total:
                break
            x, target = mix(x.to(device), y.to(device))
            loss = soft_target_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        val = evaluate(model, val_dl, device)
        history.append({"epoch": len(history) + 1, "step": step,
                        "train_loss": sum(losses) / max(1, len(losses)), **val})
        log(f"epoch {len(history)}: step {step}/{total} loss {history[-1]['train_loss']:.4f} "
            f"top-1 {val['top1']:.2f}")
    return history[-1] | {}, history, total


def run_finetune(model, model_path: str, train_shards: str, val_shards: str, train_split: str, val_split: str,
                 opts: FinetuneOptions, workers: int, device: str, out: str | None) -> dict:
    """`trainer eval finetune [--linear]`: train a classifier on the image encoder, score it, write the record."""
    from .benchmarks import _default_out, _manifest, resolve_device, topk_chance
    from .results import manifest_record, protocol_name, write_result

    t0 = time.perf_counter()
    dev = resolve_device(device)
    manifest = _manifest(train_shards, train_split)
    _manifest(val_shards, val_split)
    dataset = manifest.get("dataset", "")
    r = effective_recipe(dataset, opts)
    name = "linear" if opts.linear else "finetune"
    out_path = Path(out) if out else _default_out(model_path, f"{name}_{dataset or 'images'}")
    encoder = model.encoder("image", f"eval {name}").float()
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, r.image_size, r.image_size)).shape[-1]
    train_ds = ShardImages(train_shards, train_split, train_transform(r), opts.max_train_samples)
    val_ds = ShardImages(val_shards, val_split, eval_transform(r.image_size), opts.max_eval_samples)
    classes = max(train_ds.classes, 1)
    clf = ImageClassifier(encoder, dim, classes, linear=opts.linear).to(dev)
    final, history, steps = train_classifier(clf, train_ds, val_ds, r, classes, dev, workers)
    metrics = {"top1": final["top1"], "top5": final["top5"], "classes": classes, "chance": topk_chance(classes),
               "train_images": len(train_ds), "val_images": len(val_ds)}
    used = asdict(r) | {"train_samples": opts.max_train_samples, "eval_samples": opts.max_eval_samples}
    thesis = asdict(thesis_recipe(dataset)) | {"train_samples": 0, "eval_samples": 0}
    thesis.pop("seed")  # the seed changes a figure's noise, not the protocol
    options = {"label": "", "linear": opts.linear, "steps": steps, "history": history, "device": str(dev)}
    data = {"train": manifest_record(train_shards, train_split), "validation": manifest_record(val_shards, val_split)}
    rec = write_result(out_path, name, dataset, metrics, model.describe(), {"recipe": used}, data, options,
                       time.perf_counter() - t0, protocol_name(f"thesis-{name}", thesis, used))
    print(f"{name} [{model.task}, {dataset}] top-1 {final['top1']:.2f} top-5 {final['top5']:.2f} | "
          f"{len(train_ds)} train / {len(val_ds)} val images, {steps} steps; protocol {rec['protocol']} -> {out_path}")
    return rec
