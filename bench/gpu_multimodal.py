"""GPU benchmark of the multimodal task (S-SMKE) at the thesis' sizes, prepared to run as is on a
CUDA machine: image tower = 6 Data2Vec2 ViT-B/16 blocks, text tower = 6 BERT-base layers, shared
block, BEiTv2 ViT-B/16 teacher, memory bank of 65,536 targets, batch 256 per GPU, captions of 64
tokens, bf16, through the real Trainer. The teachers are random but written in their real
formats (fairseq, Hugging Face safetensors, the original BEiTv2 layout), so the loading code runs.
`scripts/gpu_check.sh` may call it; it needs `transformers` on the machine.

    python bench/gpu_multimodal.py                          # synthetic batches already on the GPU
    python bench/gpu_multimodal.py --shards DIR --tokenizer T   # real image-text shards
    python bench/gpu_multimodal.py --tiny --device cpu      # a seconds-long smoke run of this script

Prints `gpu-multimodal: N samples/s, data-wait W%, peak mem M GiB (...)` (medians over the timed
intervals after a warm-up one). Synthetic data measures the model step alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.models.beitv2 import BEiTShape, write_beitv2_checkpoint  # noqa: E402
from trainer.models.vit import ViTShape, write_fairseq_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from gpu_train import SyntheticLoader, add_gpu_arguments, gpu_overrides, train_and_measure  # noqa: E402


class SyntheticPairs(SyntheticLoader):
    """One random image-text batch made on the device and served `length` times per epoch."""

    def make_batch(self, cfg, g: torch.Generator, device, dtype) -> dict:
        s, B, T = cfg.augment.size, cfg.batch_size, cfg.text_max_len
        ids = torch.randint(1000, 30000, (B, T), generator=g)
        lengths = torch.randint(8, T + 1, (B,), generator=g)  # captions of varied length
        pad = torch.arange(T)[None] >= lengths[:, None]
        ids[:, 0] = 101
        ids[pad] = 0
        return {
            "image": torch.randn(B, 3, s, s, generator=g).to(device, dtype),
            "input_ids": ids.to(device), "padding_mask": pad.to(device),
            "is_pad": torch.zeros(B, dtype=torch.bool, device=device),
        }


def write_bert(path: Path, hidden: int, layers: int, heads: int) -> Path:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(path), safe_serialization=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="real image-text shards (manifest.json or dir); default synthetic")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json for --shards")
    ap.add_argument("--batch", type=int, default=256, help="per GPU (the thesis: 256)")
    add_gpu_arguments(ap, steps=10)
    ap.add_argument("--bank", type=int, default=65536, help="memory bank size")
    ap.add_argument("--tiny", action="store_true", help="small models and images: a smoke run of this script")
    ap.add_argument("--out", default="bench_out/gpu_multimodal")
    args = ap.parse_args()
    try:
        import transformers  # noqa: F401  (the text tower)
    except ImportError:
        raise UserError("the multimodal task needs `transformers` (and its tokenizers, safetensors, "
                        "huggingface_hub): install or carry their wheels") from None

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.tiny:
        img, patch, dim, heads, depth, t_dim, t_heads = 32, 8, 64, 4, 2, 48, 4
    else:
        img, patch, dim, heads, depth, t_dim, t_heads = 224, 16, 768, 12, 6, 768, 12
    # the towers only need their first `depth` blocks in the files; the teacher is complete
    d2v = write_fairseq_checkpoint(out / "d2v2.pt", ViTShape(img, patch, dim, depth, heads))
    bert = write_bert(out / "bert", dim, depth, heads)
    beit = write_beitv2_checkpoint(out / "beitv2.pth", BEiTShape(img_size=img, patch_size=patch, dim=t_dim,
                                                                 depth=2 if args.tiny else 12, num_heads=t_heads))
    over = [
        f"image_tower.checkpoint={d2v}", f"image_tower.num_heads={heads}", f"image_tower.depth={depth}",
        f"text_tower.path={bert}", f"text_tower.depth={depth}", f"teacher.checkpoint={beit}",
        f"model.num_heads={heads}", f"loss.memory_bank_size={args.bank}", f"out_dir={out / 'run'}",
        *gpu_overrides(args), f"data.batch_size={args.batch}", f"data.augment.size={img}",
        f"data.teacher_augment.size={img}",
        "data.output_dtype=bfloat16",
    ]
    if args.shards:
        if not args.tokenizer:
            raise UserError("--shards needs --tokenizer (the BERT tokenizer.json)")
        over += [f"data.manifests=[{args.shards}]", "data.decode_device=auto", f"data.tokenizer={args.tokenizer}"]
    else:
        tok = out / "tokenizer.json"
        _write_tiny_tokenizer(tok)
        over.append(f"data.tokenizer={tok}")
    cfg = load_config(REPO / "configs" / "multimodal.yaml", over)
    _, name, sps, wait, peak = train_and_measure(cfg, None if args.shards else SyntheticPairs)
    print(f"device: {name}; torch {torch.__version__}; data: {'shards ' + args.shards if args.shards else 'synthetic'}")
    print(f"gpu-multimodal: {sps:.0f} samples/s, data-wait {100 * wait:.1f}%, peak mem {peak:.1f} GiB "
          f"(batch {args.batch}, bf16, {'tiny' if args.tiny else 'ViT-B/16 + BERT-base'} towers of {depth} blocks, "
          f"BEiTv2 teacher, bank {args.bank}, compile={args.compile})")


def _write_tiny_tokenizer(path: Path) -> None:
    """A WordPiece tokenizer.json with BERT's special ids (synthetic batches never tokenise;
    the config check only needs a tokenizer no larger than BERT's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "a": 1000}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(path))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
