"""Text to token ids: OpenWebText blocks and captions, identical for pre-tokenised and raw text.

One sample is one block, whichever way it arrives, so positions, batch counts and resume work
exactly as for images:
- `npy` member (pre-tokenised by shardify, which packs documents across into blocks): the ids
  as stored (a block already holding [CLS] and [SEP]), padded to the block size or cut to it;
  a trailing run of [PAD] (shardify's last, short block) is marked as padding.
- `txt` member, tokenised in the worker: `encode_block` cleans the lines the way the reference
  does (strip; drop empty lines, '---' lines and lines holding NUL), tokenises each line,
  concatenates the ids, keeps the first block_size - 2 and adds [CLS] ... [SEP]: the block
  shardify's packer writes for a text of one document (BERT's pre-tokenizer treats a newline as
  any other whitespace, so line-wise and whole-document tokenisation agree). One document gives
  one block here, since a sample count that depended on token counts would break equal batch
  counts across ranks; for OpenWebText training use shardify's pre-tokenised blocks, which pack
  across documents and lose no token.
- captions: [CLS] + first max_len - 2 ids + [SEP], padded to max_len.
Padding uses the tokenizer's [PAD] id; the padding mask is True at padding.
"""

from __future__ import annotations

import io
import os

import numpy as np

from shardify.format import ShardifyError
from shardify.text import clean_text
from shardify.tokenization import resolve_tokenizer, special_ids


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json / vocab.txt path or a directory holding
    one, loaded exactly as shardify loads it for pre-tokenising (padding and truncation off)."""
    if not path:
        raise ValueError("data.tokenizer is empty: set it to a tokenizer.json path (or its directory)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        return resolve_tokenizer(path).load()
    except ShardifyError as exc:
        raise ValueError(str(exc)) from None


class TextEncoder:
    """Token ids for blocks and captions with one tokenizer (loaded lazily in each worker)."""

    def __init__(self, path: str):
        self.path = path
        self._tok = None

    def _load(self):
        if self._tok is None:
            tok = load_tokenizer(self.path)
            try:
                special = special_ids(tok)
            except ShardifyError as exc:
                raise ValueError(f"tokenizer {self.path}: {exc}") from None
            self.cls, self.sep, self.pad = special.cls, special.sep, special.pad
            self._tok = tok
        return self._tok

    def ids(self, texts: list[str]) -> list[list[int]]:
        tok = self._load()
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []

    def encode_block(self, text: str, block_size: int) -> np.ndarray:
        """One OWT block (ids, unpadded) from a document's text."""
        lines = clean_text(text).splitlines()  # the reference cleaning, as shardify applies it
        ids: list[int] = []
        for piece in self.ids(lines):
            ids.extend(piece)
            if len(ids) >= block_size - 2:
                break
        self._load()
        return np.array([self.cls] + ids[: block_size - 2] + [self.sep], dtype=np.int64)

    def encode_caption(self, text: str, max_len: int) -> np.ndarray:
        ids = self.ids([text.strip()])[0]
        return np.array([self.cls] + ids[: max_len - 2] + [self.sep], dtype=np.int64)

    def pad_id(self) -> int:
        # pre-tokenised shards need no tokenizer; BERT's [PAD] is 0 then
        if not self.path:
            return 0
        self._load()
        return self.pad

    def pad_batch(self, seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
        """[B, length] int64 ids and bool padding mask (True = padding)."""
        pad = self.pad_id()
        out = np.full((len(seqs), length), pad, dtype=np.int64)
        mask = np.ones((len(seqs), length), dtype=bool)
        for b, s in enumerate(seqs):
            n = min(len(s), length)
            # shardify pads the last block of a split with [PAD] to full length: a trailing run
            # of [PAD] is padding ([SEP] always closes the real tokens)
            while n > 0 and s[n - 1] == pad:
                n -= 1
            out[b, :n] = s[:n]
            mask[b, :n] = False
        return out, mask


def load_npy_ids(data: bytes) -> np.ndarray:
    """Token ids from an `npy` member (1-D integer array)."""
    a = np.load(io.BytesIO(data), allow_pickle=False)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"npy token ids must be a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)
