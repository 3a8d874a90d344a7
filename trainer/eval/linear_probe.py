"""Linear probe: a LayerNorm and a linear layer trained on frozen, cached features.

The encoder never runs here: features are extracted once (features.py) and the head is trained
on them with AdamW, a cosine schedule and cross-entropy, in shuffled mini-batches from a seeded
generator, so a rerun gives the same head.

Before the LayerNorm, each feature dimension is standardised with the mean and std of the
training features (fixed, like MAE's probe BatchNorm without affine parameters in eval mode).
Without it a feature whose variation between images is tiny next to its size (the [CLS] of a
post-LN block often is) stays invisible to a short probe, although k-NN, which only ranks
cosines, separates the classes fine. The LayerNorm then puts encoders without a final norm
(Data2Vec2's post-LN blocks, a student's last block) on a common scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .metrics import per_class_accuracy, topk_accuracy


@dataclass
class ProbeConfig:
    epochs: int = 100  # passes over the training features
    batch_size: int = 1024  # features per step
    lr: float = 1e-3  # peak AdamW learning rate (cosine to 0, no warmup)
    weight_decay: float = 1e-4  # AdamW weight decay of the linear layer
    seed: int = 0  # seeds the head's init and the batch order


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm((x_ND - self.feat_mean) / self.feat_std))


def train_probe(train_ND: torch.Tensor, labels_N: torch.Tensor, num_classes: int,
                cfg: ProbeConfig | None = None, device: str | torch.device = "cpu") -> LinearProbe:
    """Train a LinearProbe on (features, labels); returns it in eval mode."""
    cfg = cfg or ProbeConfig()
    if train_ND.shape[0] == 0:
        raise ValueError("the linear probe needs at least one training feature")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = LinearProbe(train_ND.shape[1], num_classes).to(device)
    x, y = train_ND.float().to(device), labels_N.long().to(device)
    N = x.shape[0]
    probe.feat_mean.copy_(x.mean(0))
    probe.feat_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    steps_per_epoch = math.ceil(N / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW([
        {"params": probe.head.weight, "weight_decay": cfg.weight_decay},
        {"params": [probe.head.bias, *probe.norm.parameters()], "weight_decay": 0.0},
    ], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, total))))
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(N, generator=gen).to(device)
        for s in range(0, N, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def probe_scores(probe: LinearProbe, feats_ND: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    dev = next(probe.parameters()).device
    return torch.cat([probe(feats_ND[s:s + chunk].float().to(dev)) for s in range(0, feats_ND.shape[0], chunk)])


def probe_eval(train_ND, train_labels_N, val_ND, val_labels_N, num_classes: int,
               cfg: ProbeConfig | None = None, device="cpu") -> dict:
    """Train on the training features, score the validation features: top-1/top-5, per class."""
    cfg = cfg or ProbeConfig()
    probe = train_probe(train_ND, train_labels_N, num_classes, cfg, device)
    scores = probe_scores(probe, val_ND)
    labels = val_labels_N.long().to(scores.device)
    with torch.no_grad():
        train_top1 = topk_accuracy(probe_scores(probe, train_ND), train_labels_N.long().to(scores.device), (1,))
    return {**topk_accuracy(scores, labels), **per_class_accuracy(scores, labels),
            "train_top1": train_top1["top1"], "probe": asdict(cfg)}
