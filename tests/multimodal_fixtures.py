"""Tiny real-format teachers for the multimodal (S-SMKE) tests: a BERT directory written by
`transformers` (config.json + model.safetensors), a Data2Vec2 fairseq checkpoint and a BEiTv2
checkpoint in the original layout, all random and a few hundred kB."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.models.beitv2 import BEiTShape, write_beitv2_checkpoint
from trainer.models.vit import ViTShape, write_fairseq_checkpoint

DIM = 32  # both towers must have the same width


def make_bert_dir(path: Path, hidden: int = DIM, layers: int = 3, heads: int = 2, vocab_size: int = 30522,
                  max_pos: int = 64, seed: int = 0) -> Path:
    """A random BertModel saved as a local Hugging Face directory (safetensors), with a pooler
    the tower must drop. The vocabulary size matches the uncased BERT tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=max_pos)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def make_d2v2(path: Path, dim: int = DIM, depth: int = 3, heads: int = 2, patch: int = 8, img: int = 16) -> Path:
    return write_fairseq_checkpoint(path, ViTShape(img, patch, dim, depth, heads), seed=1)


def make_beitv2(path: Path, dim: int = 24, depth: int = 2, heads: int = 2, patch: int = 8, img: int = 16,
                shared: bool = True, wrap: str = "model") -> Path:
    """Initialised wide (std 0.2, LayerScale 1) so that its [CLS] targets differ between images."""
    shape = BEiTShape(img_size=img, patch_size=patch, dim=dim, depth=depth, num_heads=heads,
                      shared_rel_pos_bias=shared, layer_scale=1.0)
    return write_beitv2_checkpoint(path, shape, seed=2, wrap=wrap, init_std=0.2)


def task_files(tmp: Path) -> dict[str, Path]:
    """The three teacher files of a tiny multimodal run (written once per directory)."""
    tmp = Path(tmp)
    files = {"d2v2": tmp / "d2v2.pt", "bert": tmp / "bert", "beitv2": tmp / "beitv2.pth"}
    if not files["d2v2"].is_file():
        make_d2v2(files["d2v2"])
    if not (files["bert"] / "config.json").is_file():
        make_bert_dir(files["bert"])
    if not files["beitv2"].is_file():
        make_beitv2(files["beitv2"])
    return files


def fixed_batch(b: int = 8, t: int = 10, seed: int = 0) -> dict:
    """One image-text batch as the loader delivers it (16 px images, padded caption ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    pad = torch.arange(t)[None, :] >= lengths[:, None]
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    ids[pad] = 0
    return {"image": torch.randn(b, 3, 16, 16, generator=g), "input_ids": ids, "padding_mask": pad,
            "is_pad": torch.zeros(b, dtype=torch.bool)}
