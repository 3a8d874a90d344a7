"""Distillation targets and losses built from layer outputs.

"layer_avg" (the thesis, "data2vec-style"): instance-normalise each layer's output over the
token axis (per sample and feature), average over the layers, then a parameter-free LayerNorm
over features (images). The student's prediction is built the same way from its own layers and
compared with MSE over all tokens.

"d2v2_topk" (original data2vec 2.0): the same recipe over the FFN outputs of the top K layers,
with the [CLS] token left out (fairseq strips extra tokens before building targets).

Multimodal (S-SMKE), at the end of the file: the image-text contrastive loss and the
contrastive distillation against a memory bank, both over the global batch of all processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def instance_norm_tokens(x_BTD: torch.Tensor) -> torch.Tensor:
    """Normalise each (sample, feature) over the T tokens, in fp32; eps as F.instance_norm."""
    return F.instance_norm(x_BTD.float().transpose(1, 2)).transpose(1, 2)


def layer_average_target(
    layers: Sequence[torch.Tensor], top_k: int | None = None, final_layer_norm: bool = True,
    instance_norm: bool = True, layer_norm: bool = False,
) -> torch.Tensor:
    """Average of the per-layer normed layers (the last `top_k` when given), then an optional
    parameter-free LayerNorm over features. Returns fp32 [B, T, D]. Per layer, in fairseq's
    order (data2vec2 `make_targets`): instance norm over tokens, then a LayerNorm over features."""
    if top_k is not None:
        layers = layers[-top_k:]
    # summing in a loop keeps peak memory at one extra [B, T, D] instead of stacking L of them
    acc = None
    for layer in layers:
        normed = instance_norm_tokens(layer) if instance_norm else layer.float()
        if layer_norm:
            normed = F.layer_norm(normed, normed.shape[-1:])
        acc = normed if acc is None else acc + normed
    y = acc / len(layers)
    if final_layer_norm:
        y = F.layer_norm(y, y.shape[-1:])
    return y


def mse_over_tokens(pred_BTD: torch.Tensor, target_BTD: torch.Tensor,
                    weight_B: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all tokens and features, in fp32. `weight_B` (0/1) leaves out
    samples, e.g. padded repeats the loader marks with is_pad. Dividing by the full batch size
    (not the kept count) keeps every rank's loss on the same scale, so DDP's gradient average
    stays the global per-sample average however the padding is spread over ranks."""
    err = (pred_BTD.float() - target_BTD.float()).pow(2)
    if weight_B is None:
        return err.mean()
    per_sample = err.flatten(1).mean(1)
    return (per_sample * weight_B).sum() / weight_B.numel()


# ---------------------------------------------------------------------------------------------
# Multimodal (S-SMKE): image-text contrastive loss and contrastive distillation with a memory bank
#
# Both are written for data parallelism the way open_clip's "local loss" is: each rank scores
# its own rows against the columns of the *global* batch (features all-gathered), with labels
# offset by rank * local batch. The gather keeps gradients (backward sums the gathered gradient
# over ranks and hands each rank its own slice), so after DDP averages the gradients the update
# is that of the same loss on one process holding the concatenated batch.

import math  # noqa: E402  (kept next to the code that needs them)

import torch.distributed as dist  # noqa: E402

LOGIT_SCALE_MAX = math.log(100.0)  # logit scales are clamped to [0, ln 100] (CLIP, FLAVA, VLMo)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) the gradient of the gathered
    tensor and returns this rank's slice: every rank's loss reaches every rank's features."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks (rank order), gradients flowing back to every rank's x. The
    identity on one process. Every rank must pass the same shape."""
    return _GatherWithGrad.apply(x) if _world()[1] > 1 else x


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks (no gradient: teacher targets, padding flags)."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _global_labels(n_local: int, device) -> torch.Tensor:
    rank, _ = _world()
    return torch.arange(n_local, device=device) + rank * n_local


def _masked_ce(logits_BN: torch.Tensor, labels_B: torch.Tensor, valid_B: torch.Tensor | None,
               valid_cols_N: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy averaged over the local rows. Padded repeats (valid False) are left out as
    rows and as negative columns; dividing by the local batch size (not the kept count) keeps
    DDP's gradient average equal to the global per-sample average, as mse_over_tokens does."""
    if valid_cols_N is not None:
        # a large finite negative, not -inf: a padded row's own label column is masked too, and
        # its (zero-weighted) loss must stay finite
        logits_BN = logits_BN.masked_fill(~valid_cols_N[None, :], -1e9)
    ce = F.cross_entropy(logits_BN, labels_B, reduction="none")
    if valid_B is None:
        return ce.mean()
    return (ce * valid_B.float()).sum() / ce.numel()


def itc_loss(image_BD: torch.Tensor, text_BD: torch.Tensor, log_logit_scale: torch.Tensor,
             valid_B: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CLIP's symmetric image-text contrastive loss on L2-normalised features, in fp32, against
    the global batch. `log_logit_scale` is the learnable ln(scale) (clamped by the caller).
    Returns loss, image_loss (image -> text), text_loss (text -> image) and the accuracy of
    the local rows."""
    img, txt = image_BD.float(), text_BD.float()
    all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
    cols = None if valid_B is None else all_gather_no_grad(valid_B.bool())
    scale = log_logit_scale.float().exp()
    logits_i = scale * img @ all_txt.t()
    logits_t = scale * txt @ all_img.t()
    labels = _global_labels(img.shape[0], img.device)
    li = _masked_ce(logits_i, labels, valid_B, cols)
    lt = _masked_ce(logits_t, labels, valid_B, cols)
    with torch.no_grad():
        acc = ((logits_i.argmax(1) == labels).float().mean() + (logits_t.argmax(1) == labels).float().mean()) / 2
    return {"loss": (li + lt) / 2, "image_loss": li, "text_loss": lt, "acc": acc}


class MemoryBank:
    """A FIFO ring of the `size` most recent teacher targets [size, D] (fp32). It starts empty:
    only filled rows are ever used as negatives. Any number of rows may be pushed at once (the
    size need not be a multiple of the global batch); a push larger than the bank keeps its
    newest `size` rows. `state_dict()` holds tensors and ints only and restores the exact row
    layout, so a resumed run computes bit-identical losses."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size < 0:
            raise ValueError(f"memory bank size must be >= 0, got {size}")
        self.size, self.dim = size, dim
        self.bank = torch.zeros(size, dim, device=device)
        self.ptr = 0  # next row to write
        self.count = 0  # rows filled so far (<= size)

    def entries(self) -> torch.Tensor:
        """The filled rows (physical order; the loss does not depend on the order)."""
        return self.bank if self.count == self.size else self.bank[:self.count]

    def ordered(self) -> torch.Tensor:
        """The filled rows from oldest to newest."""
        if self.count < self.size:
            return self.bank[:self.count]
        return torch.cat([self.bank[self.ptr:], self.bank[:self.ptr]])

    @torch.no_grad()
    def push(self, x_ND: torch.Tensor) -> None:
        if self.size == 0 or x_ND.shape[0] == 0:
            return
        x = x_ND.detach().to(self.bank.device, torch.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"memory bank holds {self.dim}-d rows, got {x.shape[-1]}-d")
        n = x.shape[0]
        if n >= self.size:
            self.bank.copy_(x[n - self.size:])
            self.ptr, self.count = 0, self.size
            return
        first = min(n, self.size - self.ptr)
        self.bank[self.ptr:self.ptr + first] = x[:first]
        if n > first:  # wrap around
            self.bank[:n - first] = x[first:]
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def state_dict(self) -> dict:
        return {"rows": self.entries().detach().cpu().clone(), "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"]
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"memory bank state holds rows of shape {tuple(rows.shape)}, expected [*, {self.dim}]")
        self.bank.zero_()
        self.ptr = self.count = 0
        if int(state["size"]) == self.size and rows.shape[0] <= self.size:
            self.bank[:rows.shape[0]] = rows.to(self.bank.device, torch.float32)
            self.count = rows.shape[0]
            self.ptr = int(state["ptr"]) % self.size if self.size else 0
            if self.count < self.size and self.ptr != self.count:
                raise ValueError("memory bank state is inconsistent: a partly filled bank must end at its pointer")
            return
        # another bank size: keep the newest rows in FIFO order
        old_size, old_ptr = int(state["size"]), int(state["ptr"])
        ordered = rows if rows.shape[0] < old_size else torch.cat([rows[old_ptr:], rows[:old_ptr]])
        self.push(ordered)


def contrastive_kd_loss(student_image_BD: torch.Tensor, student_text_BD: torch.Tensor, target_BD: torch.Tensor,
                        bank: torch.Tensor | None, log_logit_scale: torch.Tensor,
                        valid_B: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Contrastive distillation: each student embedding (image and caption, L2-normalised) is
    classified against the teacher targets of the global batch plus the memory bank's rows
    (L2-normalised; its positive is its own image's target). `target_BD` is this rank's
    normalised targets (no gradient); `bank` the filled rows or None. Returns loss (the mean of
    both), image_loss, text_loss, acc and the gathered targets (`targets_global`) for the bank."""
    s_img = F.normalize(student_image_BD.float(), dim=-1)
    s_txt = F.normalize(student_text_BD.float(), dim=-1)
    all_tgt = all_gather_no_grad(target_BD.float())
    keys = all_tgt if bank is None or bank.shape[0] == 0 else torch.cat([all_tgt, bank.to(all_tgt.dtype)])
    cols = all_valid = None
    if valid_B is not None:
        all_valid = all_gather_no_grad(valid_B.bool())
        cols = torch.cat([all_valid, all_valid.new_ones(keys.shape[0] - all_valid.shape[0])])
    scale = log_logit_scale.float().exp()
    labels = _global_labels(s_img.shape[0], s_img.device)
    logits_i = scale * s_img @ keys.t()
    logits_t = scale * s_txt @ keys.t()
    li = _masked_ce(logits_i, labels, valid_B, cols)
    lt = _masked_ce(logits_t, labels, valid_B, cols)
    with torch.no_grad():
        acc = ((logits_i.argmax(1) == labels).float().mean() + (logits_t.argmax(1) == labels).float().mean()) / 2
    out = {"loss": (li + lt) / 2, "image_loss": li, "text_loss": lt, "acc": acc, "targets_global": all_tgt}
    if all_valid is not None:
        out["valid_global"] = all_valid
    return out
