"""The multimodal losses: image-text contrastive and contrastive distillation against plain
per-row references, padding, the memory bank (FIFO order, unfilled rows, sizes that are not a
multiple of the batch, state round trip), and 2 gloo processes against 1 process holding the
concatenated batch (loss values and gradients)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.losses import MemoryBank, contrastive_kd_loss, itc_loss


def _norm(x):
    return F.normalize(x, dim=-1)


def _ref_ce_rows(q, keys, scale, rows=None):
    """Mean over rows i of -log softmax(scale * q_i . keys)[i], one row at a time."""
    rows = range(q.shape[0]) if rows is None else rows
    total = 0.0
    for i in rows:
        logits = [scale * float(q[i] @ keys[j]) for j in range(keys.shape[0])]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        total += lse - logits[i]
    return total / len(rows)


def test_itc_matches_a_plain_reference():
    torch.manual_seed(0)
    img, txt = _norm(torch.randn(6, 8)), _norm(torch.randn(6, 8))
    s = torch.tensor(math.log(1 / 0.07))
    out = itc_loss(img, txt, s)
    scale = 1 / 0.07
    ref_i = _ref_ce_rows(img, txt, scale)
    ref_t = _ref_ce_rows(txt, img, scale)
    assert out["image_loss"].item() == pytest.approx(ref_i, rel=1e-5)
    assert out["text_loss"].item() == pytest.approx(ref_t, rel=1e-5)
    assert out["loss"].item() == pytest.approx((ref_i + ref_t) / 2, rel=1e-5)
    # identical pairs and a large scale: the loss goes to 0 and the accuracy to 1
    perfect = itc_loss(img, img, torch.tensor(math.log(100.0)))
    assert perfect["acc"].item() == 1.0 and perfect["loss"].item() < out["loss"].item()


def test_kd_matches_a_plain_reference_with_and_without_bank():
    torch.manual_seed(1)
    si, st, tgt = torch.randn(5, 8), torch.randn(5, 8), _norm(torch.randn(5, 8))
    bank = _norm(torch.randn(7, 8))
    s = torch.tensor(2.0)
    for b in (None, bank[:0], bank):
        out = contrastive_kd_loss(si, st, tgt, b, s)
        keys = tgt if b is None or b.shape[0] == 0 else torch.cat([tgt, b])
        ref_i = _ref_ce_rows(_norm(si), keys, math.exp(2.0))
        ref_t = _ref_ce_rows(_norm(st), keys, math.exp(2.0))
        assert out["image_loss"].item() == pytest.approx(ref_i, rel=1e-5)
        assert out["text_loss"].item() == pytest.approx(ref_t, rel=1e-5)
        assert out["loss"].item() == pytest.approx((ref_i + ref_t) / 2, rel=1e-5)
    torch.testing.assert_close(out["targets_global"], tgt)


def test_padded_rows_are_left_out():
    torch.manual_seed(2)
    img, txt, tgt = _norm(torch.randn(6, 8)), _norm(torch.randn(6, 8)), _norm(torch.randn(6, 8))
    valid = torch.tensor([True, True, True, True, False, False])
    s = torch.tensor(1.5)
    # the padded repeats neither count as rows nor as negatives; the sum is over the full batch
    # size (as mse_over_tokens), so the loss equals the loss on the 4 real rows scaled by 4/6
    a = itc_loss(img, txt, s, valid)["loss"].item()
    b = itc_loss(img[:4], txt[:4], s)["loss"].item()
    assert a == pytest.approx(b * 4 / 6, rel=1e-5)
    bank = _norm(torch.randn(3, 8))
    a = contrastive_kd_loss(img, txt, tgt, bank, s, valid)["loss"].item()
    b = contrastive_kd_loss(img[:4], txt[:4], tgt[:4], bank, s)["loss"].item()
    assert a == pytest.approx(b * 4 / 6, rel=1e-5)


def test_logit_scales_get_gradients():
    torch.manual_seed(3)
    s1 = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    s2 = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    img = torch.randn(4, 8, requires_grad=True)
    itc_loss(_norm(img), _norm(torch.randn(4, 8)), s1)["loss"].backward()
    contrastive_kd_loss(img, torch.randn(4, 8), _norm(torch.randn(4, 8)), None, s2)["loss"].backward()
    assert s1.grad is not None and s1.grad != 0 and s2.grad is not None and s2.grad != 0


def test_memory_bank_fifo_wraparound_and_unfilled_rows():
    bank = MemoryBank(size=10, dim=2)
    assert bank.entries().shape == (0, 2)  # starts empty, no noise rows
    pushed = []
    for step, n in enumerate([4, 4, 4, 3, 12, 1]):  # 10 is no multiple of 4; one push exceeds the size
        x = torch.arange(len(pushed), len(pushed) + n, dtype=torch.float32)[:, None].repeat(1, 2)
        pushed.extend(x[:, 0].tolist())
        bank.push(x)
        expect = pushed[-10:]
        assert bank.ordered()[:, 0].tolist() == expect, step
        assert bank.count == min(len(pushed), 10)
        assert sorted(bank.entries()[:, 0].tolist()) == sorted(expect)
    with pytest.raises(ValueError, match="2-d rows"):
        bank.push(torch.zeros(1, 3))
    MemoryBank(size=0, dim=2).push(torch.ones(3, 2))  # size 0: no bank, nothing breaks


def test_unfilled_rows_are_not_negatives():
    torch.manual_seed(4)
    bank = MemoryBank(size=8, dim=4)
    bank.push(_norm(torch.randn(3, 4)))
    si, st, tgt = torch.randn(2, 4), torch.randn(2, 4), _norm(torch.randn(2, 4))
    out = contrastive_kd_loss(si, st, tgt, bank.entries(), torch.tensor(1.0))
    ref = contrastive_kd_loss(si, st, tgt, bank.bank[:3], torch.tensor(1.0))
    full = contrastive_kd_loss(si, st, tgt, bank.bank, torch.tensor(1.0))  # zero rows would count
    assert out["loss"].item() == ref["loss"].item() != full["loss"].item()


def test_memory_bank_state_round_trip(tmp_path):
    torch.manual_seed(5)
    for pushes in ([3], [3, 4, 5]):  # partly filled, then wrapped
        bank = MemoryBank(size=9, dim=3)
        for n in pushes:
            bank.push(torch.randn(n, 3))
        torch.save(bank.state_dict(), tmp_path / "bank.pt")
        state = torch.load(tmp_path / "bank.pt", weights_only=True)
        copy = MemoryBank(size=9, dim=3)
        copy.load_state_dict(state)
        torch.testing.assert_close(copy.bank, bank.bank, atol=0, rtol=0)  # same row layout
        assert (copy.ptr, copy.count) == (bank.ptr, bank.count)
        nxt = torch.randn(4, 3)
        bank.push(nxt), copy.push(nxt)
        torch.testing.assert_close(copy.ordered(), bank.ordered(), atol=0, rtol=0)
        # another bank size keeps the newest rows in order
        small = MemoryBank(size=4, dim=3)
        small.load_state_dict(bank.state_dict())
        torch.testing.assert_close(small.ordered(), bank.ordered()[-4:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        MemoryBank(size=9, dim=5).load_state_dict(bank.state_dict())


# ---------------------------------------------------------------------------------------------
# two gloo processes against one process holding the concatenated batch

B, D, M = 8, 6, 5


def _data():
    g = torch.Generator().manual_seed(7)
    img = torch.randn(B, D, generator=g)
    txt = torch.randn(B, D, generator=g)
    tgt = _norm(torch.randn(B, D, generator=g))
    bank = _norm(torch.randn(M, D, generator=g))
    return img, txt, tgt, bank


def _losses(img, txt, tgt, bank, s_itc, s_kd):
    itc = itc_loss(_norm(img), _norm(txt), s_itc)
    kd = contrastive_kd_loss(img, txt, tgt, bank, s_kd)
    return itc["loss"], kd["loss"], kd["targets_global"]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        img, txt, tgt, bank = _data()
        n = B // world
        sl = slice(rank * n, (rank + 1) * n)
        img_r = img[sl].clone().requires_grad_(True)
        txt_r = txt[sl].clone().requires_grad_(True)
        s_itc = torch.tensor(2.0, requires_grad=True)
        s_kd = torch.tensor(1.0, requires_grad=True)
        li, lk, gathered = _losses(img_r, txt_r, tgt[sl], bank, s_itc, s_kd)
        (li + lk).backward()
        torch.save({"itc": li.detach(), "kd": lk.detach(), "g_img": img_r.grad, "g_txt": txt_r.grad,
                    "g_s_itc": s_itc.grad, "g_s_kd": s_kd.grad, "gathered": gathered},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    img, txt, tgt, bank = _data()
    img.requires_grad_(True), txt.requires_grad_(True)
    s_itc = torch.tensor(2.0, requires_grad=True)
    s_kd = torch.tensor(1.0, requires_grad=True)
    li, lk, _ = _losses(img, txt, tgt, bank, s_itc, s_kd)
    (li + lk).backward()
    # DDP averages the ranks' gradients; each rank's loss is the mean over its rows of the
    # global-batch loss, so the averages equal the single-process values
    assert (r[0]["itc"] + r[1]["itc"]).item() / 2 == pytest.approx(li.item(), rel=1e-5)
    assert (r[0]["kd"] + r[1]["kd"]).item() / 2 == pytest.approx(lk.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["g_img"], r[1]["g_img"]]) / 2, img.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["g_txt"], r[1]["g_txt"]]) / 2, txt.grad, atol=1e-6, rtol=1e-5)
    assert (r[0]["g_s_itc"] + r[1]["g_s_itc"]).item() / 2 == pytest.approx(s_itc.grad.item(), rel=1e-5)
    assert (r[0]["g_s_kd"] + r[1]["g_s_kd"]).item() / 2 == pytest.approx(s_kd.grad.item(), rel=1e-5)
    # every rank sees the targets of the global batch (the bank is filled with them)
    torch.testing.assert_close(r[0]["gathered"], tgt)
    torch.testing.assert_close(r[1]["gathered"], tgt)
