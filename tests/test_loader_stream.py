"""End-to-end batches: image maths against a per-sample reference, GPU-style path, corrupt and
missing data, text and image-text batches, config errors, memory over epochs."""

from __future__ import annotations

import logging
import os
import tarfile

import pytest
import torch
import torchvision.transforms.functional as TF

from loader_fixtures import id_shards, image_shards, jpeg_bytes, npy_bytes, tokenizer_path, write_shards
from test_loader_augment import reference_crop
from trainer.data import AugmentConfig, DataConfig, build_loader
from trainer.data import decode as dec
from trainer.data import loader as loader_mod
from trainer.data.augment import draw_params
from trainer.data.decode import decode_rgb, jpeg_size
from trainer.data.text import TextEncoder

CPU = torch.device("cpu")
SIZES = [9, 4, 6]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_shards(str(tmp_path_factory.mktemp("img")), SIZES)


def members_of(d: str) -> dict[str, dict[str, bytes]]:
    out: dict = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(d, name)) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def uid_of(key: str) -> int:
    s, i = int(key[1:4]), int(key[6:])
    return sum(SIZES[:s]) + i


def reference_image(jpg: bytes, uid: int, seed: int, epoch: int, aug: AugmentConfig) -> torch.Tensor:
    H, W = jpeg_size(jpg)
    p = draw_params(seed, epoch, [0], [uid], [(H, W)], aug)
    img = torch.from_numpy(decode_rgb(jpg, H, W)).permute(2, 0, 1)
    x = reference_crop(img, p.box[0].tolist(), bool(p.flip[0]), aug.size, aug.interpolation) / 255
    if p.jitter is not None:
        b, c, s = (float(v) for v in p.jitter[0])
        x = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
    return TF.normalize(x, list(aug.mean), list(aug.std))


@pytest.mark.parametrize("train", [True, False])
def test_image_batches_match_per_sample_reference(images, train):
    aug = AugmentConfig(size=40, color_jitter=0.4 if train else 0.0, train=train)
    cfg = DataConfig(manifests=[images], batch_size=4, num_workers=0, shuffle_buffer=7, seed=3, augment=aug,
                     remainder="pad")
    ld = build_loader(cfg, 0, 1, CPU, "image")
    ld.set_epoch(2)
    raw = members_of(images)
    seen = []
    for batch in ld:
        assert batch["image"].shape == (4, 3, 40, 40) and batch["image"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["is_pad"].dtype == torch.bool
        for b, key in enumerate(batch["key"]):
            s, i = int(key[1:4]), int(key[6:])
            assert int(batch["label"][b]) == s * 100 + i
            ref = reference_image(raw[key]["jpg"], uid_of(key), 3, 2, aug)
            # uint8 rounding of the CPU path (1/255/std) times at most the contrast gain
            assert (batch["image"][b] - ref).abs().max().item() < 0.05, key
            if not batch["is_pad"][b]:
                seen.append(key)
    assert sorted(seen) == sorted(raw)


def fake_cuda_decoder(fail_keys=(), keys_by_data=None):
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas, device, sizes=None):
        imgs, errs = [], []
        for d in datas:
            if keys_by_data and keys_by_data.get(d.numpy().tobytes()) in fail_keys:
                imgs.append(None)
                errs.append("simulated nvjpeg failure")
            else:
                imgs.append(decode_jpeg(d, mode=ImageReadMode.RGB))
                errs.append("")
        return imgs, errs
    return decode


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_path_run_on_cpu_agrees_with_cpu_path(images, monkeypatch, caplog):
    monkeypatch.setattr(dec, "FAST_DCT", False)  # both paths decode with the accurate IDCT
    aug = AugmentConfig(size=32, color_jitter=0.4)
    cfg = DataConfig(manifests=[images], batch_size=5, num_workers=0, shuffle_buffer=6, augment=aug,
                     output_dtype="bfloat16")
    cpu_batches = list(build_loader(cfg, 0, 1, CPU, "image"))
    fail = cpu_batches[1]["key"][2]
    raw = members_of(images)
    keys_by_data = {v["jpg"]: k for k, v in raw.items()}
    monkeypatch.setattr(loader_mod, "decode_cuda", fake_cuda_decoder({fail}, keys_by_data))
    gpu_loader = build_loader(cfg, 0, 1, CPU, "image")
    gpu_loader.gpu_decode = True  # the GPU path's code, with CPU tensors
    with caplog.at_level(logging.WARNING):
        gpu_batches = list(gpu_loader)
    assert gpu_loader.corrupt_count == 1 and fail in caplog.text
    assert len(cpu_batches) == len(gpu_batches) == len(gpu_loader)
    for c, g in zip(cpu_batches, gpu_batches):
        assert g["image"].dtype == torch.bfloat16
        for b in range(5):
            if c["key"][b] == fail:
                assert g["is_pad"][b] and g["key"][b] != fail
                continue
            assert c["key"][b] == g["key"][b]
            d = (c["image"][b].float() - g["image"][b].float()).abs()
            assert d.mean().item() < 0.03 and d.max().item() < 0.2


def test_corrupt_samples_are_replaced_counted_and_logged(tmp_path, caplog):
    def members(key, s, i):
        jpg = jpeg_bytes(30, 40, s * 10 + i)
        if key == "s000_i0002":
            jpg = b"\xff\xd8 definitely not a jpeg"
        if key == "s001_i0001":
            jpg = jpg[: len(jpg) // 3]  # header intact, data cut: only the decoder notices
        return {"jpg": jpg, "cls": str(i).encode()}
    d = write_shards(str(tmp_path / "c"), [5, 4, 6], members)
    # truncate the last shard inside its fifth sample: that sample is cut, the sixth is gone
    last = os.path.join(d, "train-000002.tar")
    with tarfile.open(last) as tf:
        m = [x for x in tf.getmembers() if x.name == "s002_i0004.jpg"][0]
    with open(last, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)
    cfg = DataConfig(manifests=[d], batch_size=3, num_workers=0, shuffle_buffer=4,
                     augment=AugmentConfig(size=16), remainder="drop")
    ld = build_loader(cfg, 0, 1, CPU, "image")
    with caplog.at_level(logging.WARNING):
        batches = list(ld)
    assert len(batches) == len(ld) == 5
    bad = {"s000_i0002", "s001_i0001", "s002_i0004"}
    assert ld.corrupt_count == 4  # the three above and the missing sixth sample of shard 2
    for k in bad:
        assert k in caplog.text
    assert "train-000002.tar#5" in caplog.text
    real = [k for b in batches for k, p in zip(b["key"], b["is_pad"].tolist()) if not p]
    assert not set(real) & bad and len(real) == 15 - 4
    assert all(b["image"].shape == (3, 3, 16, 16) for b in batches)


def test_missing_or_unreadable_shard_is_a_clear_error(tmp_path):
    d = id_shards(str(tmp_path / "m"), [3, 2])
    os.remove(os.path.join(d, "train-000001.tar"))
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        build_loader(DataConfig(manifests=[d], batch_size=2, num_workers=0), 0, 1, CPU, "text")
    with open(os.path.join(d, "train-000001.tar"), "wb") as f:
        f.write(b"\x00" * 100 + b"garbage")
    ld = build_loader(DataConfig(manifests=[d], batch_size=2, num_workers=0, shuffle_buffer=0), 0, 1, CPU, "text")
    with pytest.raises(RuntimeError, match="train-000001.tar"):
        list(ld)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        build_loader(DataConfig(manifests=[str(tmp_path / "nowhere")]), 0, 1, CPU, "text")
    with pytest.raises(ValueError, match="split 'val'"):
        build_loader(DataConfig(manifests=[d], split="val"), 0, 1, CPU, "text")


def test_config_mistakes_are_one_line_errors(images):
    ok = dict(manifests=[images], num_workers=0)
    cases = [
        (dict(remainder="keep"), "remainder"),
        (dict(output_dtype="float16"), "output_dtype"),
        (dict(decode_device="cuda"), "cuda"),
        (dict(batch_size=0), "batch_size"),
        (dict(manifests=[]), "manifests"),
    ]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            build_loader(DataConfig(**{**ok, **kw}), 0, 1, CPU, "image")
    with pytest.raises(ValueError, match="kind"):
        build_loader(DataConfig(**ok), 0, 1, CPU, "video")
    with pytest.raises(ValueError, match="rank"):
        build_loader(DataConfig(**ok), 2, 2, CPU, "image")
    with pytest.raises(ValueError, match="tokenizer"):
        build_loader(DataConfig(**ok), 0, 1, CPU, "image_text")


def test_text_on_the_fly_equals_pre_tokenised(tmp_path):
    tok = tokenizer_path()
    enc = TextEncoder(tok)
    docs = {}
    def txt(key, s, i):
        doc = f"Document {key}.\n\n---\nThe quick brown fox jumps over {i} lazy dogs.\n" + "more words here. " * (i * 7)
        docs[key] = doc
        return {"txt": doc.encode()}
    a = write_shards(str(tmp_path / "txt"), [4, 3], txt)
    b = write_shards(str(tmp_path / "npy"), [4, 3], lambda k, s, i: {"npy": npy_bytes(enc.encode_block(docs[k], 64))})
    out = []
    for d in (a, b):
        cfg = DataConfig(manifests=[d], batch_size=2, num_workers=0, block_size=64, tokenizer=tok, remainder="pad")
        out.append(list(build_loader(cfg, 0, 1, CPU, "text")))
    for x, y in zip(*out):
        assert x["key"] == y["key"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["padding_mask"], y["padding_mask"])
    ids, mask = out[0][0]["input_ids"], out[0][0]["padding_mask"]
    assert ids.shape == (2, 64) and (ids[:, 0] == 101).all()
    n = (~mask).sum(1)
    assert ((ids[torch.arange(2), n - 1]) == 102).all()  # [SEP] closes every block
    assert (ids[mask] == 0).all()
    assert "---" not in enc._load().decode(ids[0].tolist())
    longest = [b for bt in out[0] for b in (~bt["padding_mask"]).sum(1).tolist()]
    assert max(longest) == 64 and min(longest) < 64


def test_pre_tokenised_padding_is_masked(tmp_path):
    # shardify's last block of a split is padded with [PAD] (0) to full length
    blocks = {0: [101, 7, 8, 9, 102, 0, 0, 0], 1: [101, 5, 102], 2: [101, 4, 4, 4, 4, 4, 4, 102]}
    d = write_shards(str(tmp_path / "p"), [3], lambda k, s, i: {"npy": npy_bytes(blocks[i])})
    cfg = DataConfig(manifests=[d], batch_size=3, num_workers=0, block_size=8, shuffle_buffer=0)
    b = next(iter(build_loader(cfg, 0, 1, CPU, "text")))  # no tokenizer needed for npy blocks
    assert b["input_ids"].tolist() == [blocks[0], [101, 5, 102, 0, 0, 0, 0, 0], blocks[2]]
    assert (~b["padding_mask"]).sum(1).tolist() == [5, 3, 8]


def test_image_text_batches(images):
    cfg = DataConfig(manifests=[images], batch_size=4, num_workers=0, tokenizer=tokenizer_path(), text_max_len=8,
                     augment=AugmentConfig(size=24, scale=(0.9, 1.0)))
    batch = next(iter(build_loader(cfg, 0, 1, CPU, "image_text")))
    assert batch["image"].shape == (4, 3, 24, 24)
    assert batch["input_ids"].shape == (4, 8) and batch["padding_mask"].shape == (4, 8)
    assert batch["image_id"] == [f"img-{k}" for k in batch["key"]]
    assert (batch["input_ids"][:, 0] == 101).all() and not batch["padding_mask"][:, 0].any()
    assert "label" not in batch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read RSS")
def test_memory_stays_flat_over_epochs(tmp_path):
    d = image_shards(str(tmp_path / "mem"), [23, 17, 30, 11])
    cfg = DataConfig(manifests=[d], batch_size=8, num_workers=0, shuffle_buffer=20, remainder="pad",
                     augment=AugmentConfig(size=96, color_jitter=0.4))
    ld = build_loader(cfg, 0, 1, CPU, "image")
    rss = []
    for _ in range(3):
        n = sum(1 for _ in ld)
        assert n == len(ld)
        rss.append(_rss_bytes())
    assert rss[2] <= rss[0] * 1.10, rss
