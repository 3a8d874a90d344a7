"""`trainer eval finetune [--linear]` (trainer/eval/finetune.py) against the thesis's code and timm:
layer-decay groups against the thesis's own grouping rule, the schedule against transformers',
the augmentations as timm builds them, the loss, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from test_eval_pipeline import write_class_shards
from train_fixtures import make_teacher
from trainer.cli import main
from trainer.eval import finetune as ft
from trainer.models.vit import Data2Vec2ViT, LastBlockTokens, ViTShape


def _classifier(depth=3, linear=False):
    vit = Data2Vec2ViT(ViTShape(img_size=16, patch_size=8, dim=16, depth=depth, num_heads=2), train_pos_embed=True)
    return ft.ImageClassifier(LastBlockTokens(vit), 16, 5, linear=linear)


def _thesis_groups(model, lr, wd, layer_decay):
    """name -> (lr, wd) by the thesis's ImageClassificationLightningModule._get_param_groups."""
    num_layers = len(model.encoder.vit.blocks)
    scales = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the thesis's names: fixed_positional_encoder.positions / extra_tokens are our pos_embed / cls_token
        no_decay = p.ndim == 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
        if "head" in name:
            scale = scales[-1]
        elif "blocks" in name:
            scale = scales[int(name.split("blocks.")[1].split(".")[0]) + 1]
        else:
            scale = scales[0]
        out[name] = (scale * lr, 0.0 if no_decay else wd)
    return out


@pytest.mark.parametrize("dataset,decay", [("cifar100", 0.75), ("imagenet", 0.81)])
def test_layer_decay_groups_are_the_thesis_grouping(dataset, decay):
    model = _classifier()
    r = ft.thesis_recipe(dataset)
    assert r.layer_decay == decay
    groups = ft.param_groups(model, r)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    want = _thesis_groups(model, r.lr, r.weight_decay, decay)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    # spot checks: the stem decays most, the head not at all, the last block by one factor
    assert got["encoder.vit.patch_embed.proj.weight"][0] == pytest.approx(r.lr * decay ** 4)
    assert got["encoder.vit.blocks.2.mlp.fc1.weight"] == pytest.approx((r.lr * decay, 0.01))
    assert got["head.weight"] == pytest.approx((r.lr, 0.01)) and got["head_norm.weight"] == (r.lr, 0.0)
    assert got["encoder.vit.cls_token"][1] == 0.0 and got["encoder.vit.pos_embed"][1] == 0.0


def test_linear_probe_trains_only_the_head():
    model = _classifier(linear=True)
    groups = ft.param_groups(model, ft.thesis_recipe("cifar10"))
    params = {id(p) for g in groups for p in g["params"]}
    assert params == {id(p) for p in [*model.head.parameters(), *model.head_norm.parameters()]}
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_schedule_is_transformers_cosine_with_warmup_and_adamw_settings():
    from transformers.optimization import get_cosine_schedule_with_warmup

    model = _classifier()
    r = ft.thesis_recipe("imagenet")
    opt, sched = ft.optimizer_and_schedule(model, r, 40)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_cosine_schedule_with_warmup(ref_opt, 4, 40)
    base = [g["initial_lr"] for g in opt.param_groups]  # the layer-decayed peaks
    assert max(base) == r.lr and min(base) == pytest.approx(r.lr * 0.81 ** 4)
    for _ in range(40):
        factor = ref_opt.param_groups[0]["lr"]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"]) == ((0.9, 0.999), 1e-8)


def test_augmentations_are_timms_with_the_thesis_settings():
    from timm.data import Mixup
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    r = ft.thesis_recipe("cifar10")
    steps = ft.train_transform(r).transforms
    ra = next(t for t in steps if isinstance(t, RandAugment))
    assert len(ra.ops) == 15 and ra.num_layers == 2  # timm's "inc1" op set, 2 ops per image
    assert {op.magnitude for op in ra.ops} == {9} and {op.magnitude_std for op in ra.ops} == {0.5}
    er = next(t for t in steps if isinstance(t, RandomErasing))
    assert (er.probability, er.mode, er.max_count) == (0.25, "pixel", 1)
    crop = steps[0]
    assert crop.size == (224, 224) and tuple(crop.scale) == (0.08, 1.0)
    m = ft.mixup(r, 10)
    assert isinstance(m, Mixup) and (m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.switch_prob) == (0.8, 1.0, 0.9, 0.5)
    assert (m.mode, m.label_smoothing, m.num_classes) == ("batch", 0.1, 10)
    ev = ft.eval_transform(224).transforms
    assert isinstance(ev[0], T.Resize) and ev[0].size == 224 and isinstance(ev[1], T.CenterCrop)
    assert ev[0].interpolation == T.InterpolationMode.BICUBIC


def test_schedule_length_follows_the_thesis_yaml_unless_the_run_changes():
    """configs/fine_tuning/cifar10.yaml and cifar100.yaml: max_steps 3525; imagenet.yaml 75060."""
    assert ft.thesis_recipe("cifar10").schedule_steps == ft.thesis_recipe("cifar100").schedule_steps == 3525
    assert ft.thesis_recipe("imagenet").schedule_steps == 75060 == 15 * (1_281_167 // 256)
    assert ft.effective_recipe("cifar10", ft.FinetuneOptions(lr=1e-4)).schedule_steps == 3525
    assert ft.effective_recipe("cifar10", ft.FinetuneOptions(epochs=2)).schedule_steps is None
    assert ft.effective_recipe("cifar10", ft.FinetuneOptions(max_train_samples=10)).schedule_steps is None


def test_soft_target_loss_is_the_thesis_mean_over_batch_and_classes():
    logits, target = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    want = (-target * torch.log_softmax(logits, -1)).sum() / 40
    assert ft.soft_target_loss(logits, target) == pytest.approx(want.item())


@pytest.mark.slow
def test_finetune_and_linear_end_to_end_through_the_cli(tmp_path, capsys):
    shards = write_class_shards(tmp_path / "shards")
    teacher = make_teacher(tmp_path / "t.pt", img=16)
    before = torch.load(teacher, weights_only=False)
    for linear in (False, True):
        out = tmp_path / ("lin.json" if linear else "ft.json")
        main(["eval", "finetune", str(teacher), "--data2vec2", "--train-shards", str(shards), "--epochs", "2",
              "--batch-size", "8", "--image-size", "16", "--workers", "0", "--out", str(out), "--device", "cpu",
              *(["--linear"] if linear else [])])
        rec = json.loads(out.read_text())
        assert rec["benchmark"] == ("linear" if linear else "finetune") and rec["kind"] == "shardify-kd-eval"
        changed = "batch_size, epochs, image_size, schedule_steps"  # the yaml's schedule length goes too
        assert rec["protocol"] == f"custom (thesis-{rec['benchmark']} with {changed} changed)"
        m = rec["metrics"]
        assert (m["train_images"], m["val_images"], m["classes"]) == (24, 6, 4) and 0 <= m["top1"] <= 100
        assert rec["options"]["steps"] == 6 and len(rec["options"]["history"]) == 2
        assert rec["config"]["recipe"]["mixup"] == 0.8
    assert "linear [data2vec2" in capsys.readouterr().out
    assert torch.equal(torch.load(teacher, weights_only=False)["model"]["modality_encoders.IMAGE.extra_tokens"],
                       before["model"]["modality_encoders.IMAGE.extra_tokens"])
