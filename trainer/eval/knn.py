"""k-NN classification on frozen features: cosine similarity, k nearest training samples,
temperature-weighted votes (the DINO protocol: weight exp(sim / T), k=20, T=0.07).

Neighbours: the k training samples of highest cosine similarity; where several tie at the k-th
place, the lower training indices are taken (so the result never depends on a sort's whims).
Class scores are the summed weights of the neighbours of each class; accuracy then uses the
rule of `metrics.py` (ties count against the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import per_class_accuracy, topk_accuracy


def _neighbours(sim_QN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = sim_QN.topk(k, dim=1)
    # rows where more samples share the k-th value than topk kept: resolve by index (rare)
    kth = vals[:, -1:]
    tied = (sim_QN == kth).sum(1) != (vals == kth).sum(1)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        svals, sidx = sim_QN[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = svals[:, :k], sidx[:, :k]
    return vals, idx


def knn_scores(train_ND: torch.Tensor, train_labels_N: torch.Tensor, query_QD: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256,
               device: str | torch.device | None = None) -> torch.Tensor:
    """Class scores [Q, num_classes] of each query from its k nearest training samples, computed
    on `device` (default: where train_ND is; ImageNet's 50k x 1.28M similarities want a GPU)."""
    if train_ND.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_ND.shape[0])
    train = F.normalize(train_ND.float().to(device or train_ND.device), dim=1)
    labels = train_labels_N.long().to(train.device)
    out = torch.zeros(query_QD.shape[0], num_classes, device=train.device)
    for s in range(0, query_QD.shape[0], chunk):
        q = F.normalize(query_QD[s:s + chunk].float().to(train.device), dim=1)
        sim, idx = _neighbours(q @ train.T, k)
        weights = (sim / temperature).exp()
        out[s:s + chunk].scatter_add_(1, labels[idx], weights)
    return out


def knn_eval(train_ND, train_labels_N, val_ND, val_labels_N, num_classes: int, k: int = 20,
             temperature: float = 0.07, device=None) -> dict:
    """Top-1/top-5 (and mean per-class top-1) of k-NN on the validation features."""
    scores = knn_scores(train_ND, train_labels_N, val_ND, num_classes, k, temperature, device=device)
    labels = val_labels_N.long().to(scores.device)
    return {**topk_accuracy(scores, labels), **per_class_accuracy(scores, labels),
            "k": min(k, int(train_ND.shape[0])), "temperature": temperature}
