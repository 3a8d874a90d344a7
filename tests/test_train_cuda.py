"""The trainer on a CUDA device (bf16 autocast, fused AdamW, CUDA peak memory): skipped with a
visible reason when no GPU is present."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides
from trainer.config import load_config
from trainer.loop import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_training_on_cuda(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    over = tiny_overrides(tmp_path, teacher, device="cuda", precision="bf16", **{"teacher.dtype": "bfloat16",
                          "schedule.max_steps": 4, "data.decode_device": "cuda"})
    t = Trainer(load_config(DEMO_CONFIG, over))
    try:
        t.train()
    finally:
        t.close()
    assert t.device.type == "cuda" and t.task.teacher.patch_embed.proj.weight.is_cuda
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["loss"] > 0 and records[-1]["peak_mem_bytes"] > 0
