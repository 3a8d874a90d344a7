"""Pre-tokenisation for text shards: the tokenizer, its special ids, and fixed-size block packing.

The tokenizer is resolved here for both sides: shardify pre-tokenises with it, and the trainer
loads the same file the same way (`resolve_tokenizer(...).load()`, padding and truncation off)
and reads [CLS]/[SEP]/[PAD] through `special_ids`.

Packing as the reference does it: the token ids of all documents of a split, in source order,
are concatenated (no separator between documents) and cut into blocks of `block_size - 2` ids;
each block gets [CLS] in front and [SEP] at the end, so a block is `block_size` ids (254 + 2 =
256 by default). The last block of a split is the only one that may be short: it is padded
with [PAD] after its [SEP], and its metadata gives the number of real tokens. No token is lost
or duplicated: the concatenation of all blocks' bodies is the concatenation of all documents.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardify.checksum import sha256_file
from shardify.format import ShardifyError


@dataclass
class TokenizerSpec:
    """Where the tokenizer came from and what identifies it (recorded in the manifest)."""

    name: str  # the path or hub id given by the user
    files: dict  # {file name: sha256}
    path: str  # the file the tokenizer is built from (tokenizer.json or vocab.txt)
    kind: str  # "tokenizer.json" or "wordpiece-vocab"

    def load(self):
        from tokenizers import Tokenizer

        if self.kind == "tokenizer.json":
            tok = Tokenizer.from_file(self.path)
        else:
            from tokenizers.implementations import BertWordPieceTokenizer

            tok = BertWordPieceTokenizer(self.path, lowercase=True)._tokenizer
        # A tokenizer.json may carry a truncation or padding setting: neither may apply here.
        tok.no_truncation()
        tok.no_padding()
        return tok

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}:{self.files[name]}\n".encode())
        return h.hexdigest()


@dataclass
class SpecialIds:
    cls: int
    sep: int
    pad: int
    vocab_size: int

    @property
    def dtype(self):
        """uint16 when every id fits (BERT's 30,522 do), else uint32."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32


def special_ids(tok) -> SpecialIds:
    """[CLS], [SEP] and [PAD] of a `tokenizers.Tokenizer`: blocks are [CLS] ids [SEP] [PAD]..."""
    ids = []
    for token in ("[CLS]", "[SEP]", "[PAD]"):
        i = tok.token_to_id(token)
        if i is None:
            raise ShardifyError(f"the tokenizer has no {token} token; a BERT-style vocabulary is needed")
        ids.append(i)
    return SpecialIds(*ids, vocab_size=tok.get_vocab_size(with_added_tokens=True))


def resolve_tokenizer(name: str) -> TokenizerSpec:
    """A local tokenizer.json / vocab.txt / directory holding one, or a hub model id."""
    p = Path(name)
    if p.is_dir():
        for fname, kind in (("tokenizer.json", "tokenizer.json"), ("vocab.txt", "wordpiece-vocab")):
            if (p / fname).is_file():
                path = str(p / fname)
                return TokenizerSpec(name, {fname: sha256_file(path)}, path, kind)
        raise ShardifyError(f"--tokenizer {name}: the directory has no tokenizer.json or vocab.txt")
    if p.is_file():
        kind = "tokenizer.json" if p.suffix == ".json" else "wordpiece-vocab"
        return TokenizerSpec(name, {p.name: sha256_file(str(p))}, str(p), kind)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover
        raise ShardifyError("huggingface_hub is needed to fetch a tokenizer from the hub") from None
    last_exc = None
    for fname, kind in (("tokenizer.json", "tokenizer.json"), ("vocab.txt", "wordpiece-vocab")):
        try:
            path = hf_hub_download(name, fname)
        except Exception as exc:  # not found, offline, gated: try the next file, then explain
            last_exc = exc
            continue
        return TokenizerSpec(name, {fname: sha256_file(path)}, path, kind)
    raise ShardifyError(f"--tokenizer {name}: not a local file or directory, and the hub gave no "
                        f"tokenizer.json or vocab.txt ({type(last_exc).__name__}: {last_exc})")


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    """Token ids (no special tokens) of each text, as uint32 arrays."""
    if not texts:
        return []
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use: same
    # ids, about a quarter less time.
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts, add_special_tokens=False)]


class Packer:
    """What every packing shares: [CLS] body [SEP] blocks of `block_size` ids, the ids of the
    block being filled (`_parts`, `_pending` of them)."""

    def __init__(self, block_size: int, special: SpecialIds):
        if block_size < 3:
            raise ShardifyError("--block-size must be at least 3 ([CLS], one token, [SEP])")
        self.block_size = block_size
        self.body = block_size - 2
        self.sp = special
        self._parts: list[np.ndarray] = []
        self._pending = 0


class BlockPacker(Packer):
    """Concatenates token ids and cuts them into [CLS] body [SEP] blocks of fixed size."""

    def add(self, ids: np.ndarray) -> list[np.ndarray]:
        """Add a document's ids; return the blocks that became full (each block_size long)."""
        if len(ids):
            self._parts.append(ids)
            self._pending += len(ids)
        out = []
        if self._pending >= self.body:
            flat = np.concatenate(self._parts)
            n_full = len(flat) // self.body
            for i in range(n_full):
                out.append(self._wrap(flat[i * self.body:(i + 1) * self.body]))
            rest = flat[n_full * self.body:]
            self._parts = [rest] if len(rest) else []
            self._pending = len(rest)
        return out

    def finish(self) -> tuple[np.ndarray, int] | None:
        """The last, short block padded with [PAD], and its number of real body tokens."""
        if not self._pending:
            return None
        body = np.concatenate(self._parts)
        self._parts, self._pending = [], 0
        block = self._wrap(body)
        pad = np.full(self.block_size - len(block), self.sp.pad, dtype=block.dtype)
        return np.concatenate([block, pad]), len(body)

    def _wrap(self, body: np.ndarray) -> np.ndarray:
        dt = self.sp.dtype
        return np.concatenate([np.array([self.sp.cls], dt), body.astype(dt), np.array([self.sp.sep], dt)])


def npy_bytes(arr: np.ndarray) -> bytes:
    """The .npy encoding of an array (deterministic: same array, same bytes)."""
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def block_body(block: np.ndarray, n_tokens: int) -> np.ndarray:
    """The real tokens of a block: drop [CLS], [SEP] and the padding."""
    return block[1:1 + n_tokens]


def set_single_threaded() -> None:
    """Keep tokenizers' thread pool to one thread (worker processes already split the work)."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
