"""Distillation targets and losses built from layer outputs.

"layer_avg" (the thesis, "data2vec-style"): instance-normalise each layer's output over the
token axis (per sample and feature), average over the layers, then a parameter-free LayerNorm
over features (images). The student's prediction is built the same way from its own layers and
compared with MSE over all tokens.

"d2v2_topk" (original data2vec 2.0): the same recipe over the FFN outputs of the top K layers,
with the [CLS] token left out (fairseq strips extra tokens before building targets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def instance_norm_tokens(x_BTD: torch.Tensor) -> torch.Tensor:
    """Normalise each (sample, feature) over the T tokens, in fp32; eps as F.instance_norm."""
    return F.instance_norm(x_BTD.float().transpose(1, 2)).transpose(1, 2)


def layer_average_target(
    layers: Sequence[torch.Tensor], top_k: int | None = None, final_layer_norm: bool = True
) -> torch.Tensor:
    """Average of the instance-normed layers (the last `top_k` when given), then an optional
    parameter-free LayerNorm over features. Returns fp32 [B, T, D]."""
    if top_k is not None:
        layers = layers[-top_k:]
    # summing in a loop keeps peak memory at one extra [B, T, D] instead of stacking L of them
    acc = None
    for layer in layers:
        normed = instance_norm_tokens(layer)
        acc = normed if acc is None else acc + normed
    y = acc / len(layers)
    if final_layer_norm:
        y = F.layer_norm(y, y.shape[-1:])
    return y


def mse_over_tokens(pred_BTD: torch.Tensor, target_BTD: torch.Tensor, weight_B: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all tokens and features, in fp32. `weight_B` (0/1) leaves out
    samples, e.g. padded repeats the loader marks with is_pad. Dividing by the full batch size
    (not the kept count) keeps every rank's loss on the same scale, so DDP's gradient average
    stays the global per-sample average however the padding is spread over ranks."""
    err = (pred_BTD.float() - target_BTD.float()).pow(2)
    if weight_B is None:
        return err.mean()
    per_sample = err.flatten(1).mean(1)
    return (per_sample * weight_B).sum() / weight_B.numel()
