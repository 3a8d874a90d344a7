"""Classification metrics on score matrices, with one explicit tie rule.

Tie rule (pessimistic): the true class's rank is the number of *other* classes whose score is
greater than or equal to its own. A prediction is a top-k hit when that rank is below k. So a
tie never counts in the model's favour: a constant classifier scores 0% top-1, not 1/C or the
share of class 0, and the figure does not depend on how a sort orders equal values.
"""

from __future__ import annotations

import torch


def target_ranks(scores_NC: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """Rank of each sample's true class among all classes (0 = best), ties counted against it."""
    if scores_NC.ndim != 2 or target_N.ndim != 1 or scores_NC.shape[0] != target_N.shape[0]:
        raise ValueError(f"need scores [N, C] and targets [N], got {tuple(scores_NC.shape)} and "
                         f"{tuple(target_N.shape)}")
    true_N1 = scores_NC.gather(1, target_N.long()[:, None])
    # >= counts the true class itself once: subtract it
    return (scores_NC >= true_N1).sum(dim=1) - 1


def topk_accuracy(scores_NC: torch.Tensor, target_N: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %, ...} over the N samples (k larger than C counts every sample)."""
    if target_N.numel() == 0:
        raise ValueError("no samples to score")
    ranks = target_ranks(scores_NC, target_N)
    return {f"top{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}


def per_class_accuracy(scores_NC: torch.Tensor, target_N: torch.Tensor) -> dict[str, float | int]:
    """Top-1 accuracy averaged over the classes that have samples. A class without samples has no
    accuracy (it is not a 0 and not a division by zero): it is left out and counted."""
    ranks = target_ranks(scores_NC, target_N)
    C = scores_NC.shape[1]
    counts = torch.bincount(target_N.long(), minlength=C)
    hits = torch.bincount(target_N.long(), weights=(ranks == 0).double(), minlength=C)
    present = counts > 0
    mean = (hits[present] / counts[present]).mean().item() if present.any() else float("nan")
    return {"mean_per_class_top1": 100.0 * mean, "classes_with_samples": int(present.sum()),
            "classes_without_samples": int(C - present.sum())}
