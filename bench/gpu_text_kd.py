"""GPU benchmark of text distillation (F-DistilBERT), prepared to run as is on a CUDA machine:
a BERT-base teacher (random weights saved in the Hugging Face format, so the real loading code
runs; bert-base-uncased's shape) distilled into its embeddings + first 6 layers, bf16 autocast,
the thesis batch of 256 blocks of 256 tokens, through the real Trainer and the real streaming
loader on pre-tokenised block shards written here (random ids, shardify's npy block layout).

    python bench/gpu_text_kd.py                       # BERT-base, batch 256 x 256 tokens, cuda
    python bench/gpu_text_kd.py --compile             # with torch.compile
    python bench/gpu_text_kd.py --tiny --device cpu   # a seconds-long smoke run of this script

Prints one line per timed interval (the loop's log) and a summary:
`gpu-text-kd: N samples/s (T tokens/s), data-wait W%, peak mem M GiB (...)`.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shardify.manifest import simple_manifest  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.models.text import bert_from_config  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from gpu_train import add_gpu_arguments, gpu_overrides, train_and_measure  # noqa: E402

BERT_BASE = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
             "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
TINY = {**BERT_BASE, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def write_teacher(path: Path, config: dict) -> Path:
    """A random BERT in the HF layout (config.json + model.safetensors)."""
    torch.manual_seed(0)
    bert_from_config(config).save_pretrained(str(path), safe_serialization=True)
    return path


def write_blocks(root: Path, n: int, block: int, per_shard: int = 1024, vocab: int = 30522) -> Path:
    """`n` blocks of [CLS] random ids [SEP] as npy members (uint16, as shardify writes them),
    with a manifest carrying shardify's tokenizer record."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, i = [], 0
    for s in range((n + per_shard - 1) // per_shard):
        name = f"train-{s:06d}.tar"
        keys = []
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(min(per_shard, n - i)):
                ids = np.concatenate([[101], rng.integers(1000, vocab, block - 2), [102]]).astype(np.uint16)
                buf = io.BytesIO()
                np.save(buf, ids)
                key = f"train-block-{i:09d}"
                ti = tarfile.TarInfo(f"{key}.npy")
                ti.size = buf.tell()
                buf.seek(0)
                tf.addfile(ti, buf)
                keys.append(key)
                i += 1
        shards.append({"name": name, "samples": len(keys), "bytes": (root / name).stat().st_size,
                       "first_key": keys[0], "last_key": keys[-1]})
    simple_manifest(root, "bench-blocks", ["npy"], {"train": shards},
                    tokenizer={"name": "random ids", "vocab_size": vocab, "block_size": block,
                               "cls_id": 101, "sep_id": 102, "pad_id": 0, "dtype": "uint16"})
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--block", type=int, default=256, help="tokens per block incl. [CLS]/[SEP]")
    add_gpu_arguments(ap, steps=10)
    ap.add_argument("--workers", type=int, default=6, help="loader worker processes")
    ap.add_argument("--tiny", action="store_true", help="small model, short blocks: a smoke run of this script")
    ap.add_argument("--out", default="bench_out/gpu_text_kd")
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    teacher = write_teacher(out / "teacher", TINY if args.tiny else BERT_BASE)
    shards = write_blocks(out / "shards", args.batch * args.steps * (1 + args.repeats), args.block)
    over = [
        f"teacher.path={teacher}", f"out_dir={out / 'run'}", *gpu_overrides(args),
        f"student.depth={2 if args.tiny else 6}",
        f"data.manifests=[{shards}]", "data.val_split=", f"data.batch_size={args.batch}",
        f"data.block_size={args.block}", f"data.num_workers={args.workers}",
        "loss.allow_stream_blocks=true",  # full blocks of random ids: a throughput measurement
    ]
    cfg = load_config(REPO / "configs" / "text_kd.yaml", over)
    _, name, sps, wait, peak = train_and_measure(cfg)
    print(f"device: {name}; torch {torch.__version__}; {args.workers} loader workers")
    print(f"gpu-text-kd: {sps:.0f} samples/s ({sps * args.block:.0f} tokens/s), data-wait {100 * wait:.1f}%, "
          f"peak mem {peak:.1f} GiB (batch {args.batch} x {args.block} tokens, bf16, "
          f"{'tiny' if args.tiny else 'BERT-base'} teacher + {cfg.task_cfg.student.depth}-layer student, "
          f"compile={args.compile})")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
