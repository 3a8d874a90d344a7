"""Retrieval fine-tuning as the thesis ran it (`trainer eval retrieval-finetune`), then Recall@k.

The protocol of `TimCares/MasterThesis:configs/fine_tuning/retrieval_{coco,flickr30k}.yaml` with
`src/models/retrieval_finetune.py`: the whole multimodal student is trained on the data set's
train split with the image-text contrastive loss alone (CLIP's symmetric cross-entropy on the
normalised [CLS] embeddings, the student's learnable logit scale clamped to [0, ln 100]);
images RandomResizedCrop scale (0.5, 1.0) + flip 0.5, no colour jitter, 64 caption tokens;
AdamW lr 3e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.01 except on 1-D parameters, biases,
[CLS], positions and embeddings; 20 epochs at batch 1024, cosine with a 10% linear warmup
(transformers' `get_cosine_schedule_with_warmup`). Then the test split is scored exactly as the
zero-shot retrieval (trainer/eval/retrieval.py). One record, benchmark `retrieval_finetune`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class RetrievalRecipe:
    epochs: float = 20
    batch_size: int = 1024
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.0
    text_max_len: int = 64
    seed: int = 42


def clip_loss(image_ND: torch.Tensor, text_ND: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss on normalised embeddings; pair i is the positive of row i."""
    img, txt = F.normalize(image_ND.float(), dim=-1), F.normalize(text_ND.float(), dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return (p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
            or "embeddings" in name)


def param_groups(module: nn.Module, r: RetrievalRecipe) -> list[dict]:
    """The thesis's two groups: weight decay on matrices, none on 1-D, biases, [CLS], positions
    and embeddings (its rule, by parameter name)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_and_schedule(module: nn.Module, r: RetrievalRecipe, total_steps: int):
    from transformers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(param_groups(module, r), lr=r.lr, betas=r.betas, eps=r.eps)
    return opt, get_cosine_schedule_with_warmup(opt, int(total_steps * r.warmup_frac), total_steps)


class _Towers(nn.Module):
    """The student's two encoders (sharing its modules) and its ITC logit scale."""

    def __init__(self, image: nn.Module, text: nn.Module):
        super().__init__()
        self.image, self.text = image, text
        names = [n for n, _ in self.named_parameters() if n.endswith("logit_scales")]
        # the student's ITC scale on x (the last of [x_interm, x]); a model without one gets CLIP's init
        self.own_scale = None if names else nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._scales_name = names[0] if names else "own_scale"

    def logit_scale(self) -> torch.Tensor:
        scales = self.get_parameter(self._scales_name)
        return scales[-1] if scales.ndim else scales

    def clamp_(self) -> None:
        with torch.no_grad():
            self.get_parameter(self._scales_name).clamp_(0.0, LOGIT_SCALE_MAX)


@dataclass
class RetrievalFinetuneOptions:
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None


def run_retrieval_finetune(model, model_path: str, shards: str, train_split: str, test_split: str,
                           opts: RetrievalFinetuneOptions, workers: int, device: str, out: str | None,
                           tokenizer: str | None = None) -> dict:
    from trainer.data import AugmentConfig
    from trainer.data.loader import build_loader

    from .benchmarks import _default_out, _manifest, resolve_device
    from .features import eval_data_config, extract_pair_embeddings
    from .results import manifest_record, protocol_name, write_result
    from .retrieval import retrieval_metrics

    t0 = time.perf_counter()
    dev = resolve_device(device)
    manifest = _manifest(shards, train_split)
    _manifest(shards, test_split)
    dataset = manifest.get("dataset", "") or Path(shards).name
    r = replace(RetrievalRecipe(), **{k: v for k, v in asdict(opts).items() if v is not None})
    out_path = Path(out) if out else _default_out(model_path, f"retrieval_finetune_{dataset}")
    tok = tokenizer or model.tokenizer
    if not tok:
        raise UserError("no tokenizer: the model's config names none; pass --tokenizer")
    towers = _Towers(model.encoder("image", "retrieval-finetune"), model.encoder("text", "retrieval-finetune"))
    towers = towers.to(dev).float()
    aug = replace(model.augment, scale=r.crop_scale, hflip=r.hflip, color_jitter=r.color_jitter, train=True)
    cfg = replace(eval_data_config(shards, train_split, AugmentConfig(), r.batch_size, workers, tok, r.text_max_len),
                  augment=aug, seed=r.seed, shuffle_buffer=max(1, r.batch_size * 4), remainder="drop")
    try:
        loader = build_loader(cfg, 0, 1, dev, "image_text")
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"retrieval-finetune: {e}") from None
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise UserError(f"the {train_split} split has fewer pairs than one batch of {r.batch_size}")
    total = max(1, math.ceil(steps_per_epoch * r.epochs))
    torch.manual_seed(r.seed)
    opt, sched = optimizer_and_schedule(towers, r, total)
    step, history = 0, []
    while step < total:
        towers.train()
        loader.set_epoch(len(history))
        losses = []
        for batch in loader:
            if step >= total:
                break
            img = towers.image(batch["image"].to(dev).float())[:, 0]
            txt = towers.text(batch["input_ids"].to(dev), batch["padding_mask"].to(dev))[:, 0]
            loss = clip_loss(img, txt, towers.logit_scale())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            towers.clamp_()
            step += 1
            losses.append(loss.item())
        history.append({"epoch": len(history) + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses))})
        print(f"epoch {len(history)}: step {step}/{total} loss {history[-1]['train_loss']:.4f}")
    towers.eval()
    test_cfg = eval_data_config(shards, test_split, model.augment, max(2, min(r.batch_size, 256)), workers, tok,
                                r.text_max_len)
    with torch.no_grad():
        emb = extract_pair_embeddings(towers.image, towers.text, test_cfg, dev)
    metrics = retrieval_metrics(emb["images"], emb["image_ids"], emb["texts"], emb["caption_image_ids"])
    used = asdict(r)
    thesis = asdict(RetrievalRecipe())
    thesis.pop("seed")  # the seed changes a figure's noise, not the protocol
    options = {"label": "", "tokenizer": tok, "steps": total, "history": history, "device": str(dev),
               "logit_scale": float(towers.logit_scale().detach().exp())}
    data = {"train": manifest_record(shards, train_split), "test": manifest_record(shards, test_split)}
    rec = write_result(out_path, "retrieval_finetune", dataset, metrics, model.describe(), {"recipe": used}, data,
                       options, time.perf_counter() - t0, protocol_name("thesis-retrieval-finetune", thesis, used))
    print(f"retrieval-finetune [{model.task}, {dataset} {test_split}] text R@1/5/10 "
          f"{metrics['i2t_R@1']:.2f}/{metrics['i2t_R@5']:.2f}/{metrics['i2t_R@10']:.2f} | image R@1/5/10 "
          f"{metrics['t2i_R@1']:.2f}/{metrics['t2i_R@5']:.2f}/{metrics['t2i_R@10']:.2f} | {total} steps; "
          f"protocol {rec['protocol']} -> {out_path}")
    return rec
