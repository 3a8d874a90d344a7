"""Image-text retrieval: Recall@k in both directions, positives decided by image ids.

Embeddings are compared by dot product (the callers pass L2-normalised embeddings, so this is
cosine similarity). Each image appears once; each caption carries the id of its image.
- text -> image: a caption is a hit at k when its image is within the top k images.
- image -> text: an image is a hit at k when *any* of its captions is within the top k captions,
  i.e. when fewer than k captions of other images score at least as high as its best caption.
Ties count against the model (as in metrics.py): a rival at exactly the same score ranks ahead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _index_of(image_ids: Sequence, caption_image_ids: Sequence) -> torch.Tensor:
    pos = {}
    for i, iid in enumerate(image_ids):
        if iid in pos:
            raise ValueError(f"image id {iid!r} appears twice among the images")
        pos[iid] = i
    missing = [c for c in caption_image_ids if c not in pos]
    if missing:
        raise ValueError(f"{len(missing)} caption(s) belong to no image (first: image id {missing[0]!r})")
    return torch.tensor([pos[c] for c in caption_image_ids], dtype=torch.long)


@torch.no_grad()
def retrieval_metrics(image_ID: torch.Tensor, image_ids: Sequence, text_TD: torch.Tensor,
                      caption_image_ids: Sequence, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """{"i2t_R@1": %, ..., "t2i_R@1": %, ..., "images": n_img, "captions": T} (I2T = text retrieval)."""
    if image_ID.shape[0] != len(image_ids) or text_TD.shape[0] != len(caption_image_ids):
        raise ValueError("one id per image and one image id per caption are needed")
    if len(image_ids) == 0 or len(caption_image_ids) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    owner_T = _index_of(image_ids, caption_image_ids).to(text_TD.device)
    img = image_ID.float().to(text_TD.device)
    txt = text_TD.float()
    n_img, T = img.shape[0], txt.shape[0]

    # text -> image: rank of the caption's own image among all images
    t2i_rank = torch.empty(T, dtype=torch.long, device=txt.device)
    for s in range(0, T, chunk):
        sim = txt[s:s + chunk] @ img.T  # [t, n_img]
        own = sim.gather(1, owner_T[s:s + chunk, None])
        t2i_rank[s:s + chunk] = (sim >= own).sum(1) - 1

    # image -> text: best own caption's score against the captions of other images
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=txt.device)
    has_caption = torch.bincount(owner_T, minlength=n_img) > 0
    for s in range(0, n_img, chunk):
        sim = img[s:s + chunk] @ txt.T  # [i, T]
        mine = owner_T[None, :] == torch.arange(s, min(s + chunk, n_img), device=txt.device)[:, None]
        best_own = sim.masked_fill(~mine, float("-inf")).max(1, keepdim=True).values
        i2t_rank[s:s + chunk] = ((sim >= best_own) & ~mine).sum(1)
    i2t_rank = i2t_rank[has_caption]

    out: dict = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out["images"], out["captions"] = n_img, T
    out["chance"] = chance_recall(torch.bincount(owner_T, minlength=n_img)[has_caption].tolist(), ks)
    return out


def chance_recall(captions_per_image: Sequence[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k of a random ranking: text -> image k / n_img; image -> text, for an image with P of
    the T captions, 1 - C(T-P, k) / C(T, k) (some own caption among k random ones), averaged."""
    n_img, T = len(captions_per_image), sum(captions_per_image)
    out = {}
    for k in ks:
        kk = min(k, T)
        out[f"i2t_R@{k}"] = 100.0 * sum(1 - math.comb(T - p, kk) / math.comb(T, kk) for p in captions_per_image) / n_img
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * min(k, n_img) / n_img
    return out
