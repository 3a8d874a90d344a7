"""The GPU path's code on the CPU: no device-to-host reads or blocking copies in the device stage
(run on the `meta` device, where any read of a value fails), the look-ahead thread's exact state,
the decoder's batch bisection and error classes, and the same refusals on both decode paths."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from loader_fixtures import id_shards, image_shards, jpeg_bytes, write_shards
from test_loader_augment import random_batch, reference_crop
from trainer.data import AugmentConfig, DataConfig, build_loader
from trainer.data import decode as dec
from trainer.data import loader as loader_mod
from trainer.data.augment import finish, resized_crops
from trainer.data.decode import decode_cuda, is_device_failure, jpeg_size
from trainer.data.loader import canonical_device
from trainer.data.stream import BatchStream

CPU = torch.device("cpu")
META = torch.device("meta")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_shards(str(tmp_path_factory.mktemp("img")), [9, 4, 6])


def meta_decoder(datas, device, sizes=None):
    """decode_cuda's contract with shape-only outputs: (images on `device`, errors)."""
    out = []
    for d in datas:
        H, W = jpeg_size(d.numpy().tobytes())
        out.append(torch.empty((3, H, W), dtype=torch.uint8, device=device))
    return out, [""] * len(datas)


class CopySpy:
    """Records every host-to-device `Tensor.to` and whether it was non-blocking."""

    def __init__(self, monkeypatch):
        self.calls: list[bool] = []
        orig = torch.Tensor.to

        def to(t, *a, **k):
            r = orig(t, *a, **k)
            if t.device.type == "cpu" and r.device.type != "cpu":
                self.calls.append(bool(k.get("non_blocking", False)))
            return r
        monkeypatch.setattr(torch.Tensor, "to", to)


@pytest.mark.parametrize("gpu_decode,jitter", [(True, 0.4), (True, 0.0), (False, 0.4)])
def test_device_stage_never_reads_back_or_blocks(images, monkeypatch, gpu_decode, jitter):
    """On `meta` tensors .item(), .tolist(), .cpu(), bool() and blocking reads all raise: the
    device stage passing here means it reads nothing back from the device, and every copy to
    the device it makes is non-blocking (on CUDA: from pinned memory, see augment.to_device)."""
    aug = AugmentConfig(size=24, color_jitter=jitter)
    cfg = DataConfig(manifests=[images], batch_size=5, num_workers=0, augment=aug, output_dtype="bfloat16")
    ld = build_loader(cfg, 0, 1, CPU, "image")
    ld.device, ld.gpu_decode = META, gpu_decode
    monkeypatch.setattr(loader_mod, "decode_cuda", meta_decoder)
    spy = CopySpy(monkeypatch)
    stream = BatchStream(ld.sources, cfg, "image", 0, 1, 0, 0, gpu_decode)
    n = 0
    for wb in stream:
        out = ld._device_stage(wb)
        assert out["image"].device == META and out["image"].shape == (5, 3, 24, 24)
        assert out["image"].dtype == torch.bfloat16 and out["label"].device == META
        n += 1
    assert n == len(ld) and spy.calls and all(spy.calls)


def test_text_device_stage_never_reads_back_or_blocks(tmp_path, monkeypatch):
    d = id_shards(str(tmp_path / "ids"), [5, 4])
    cfg = DataConfig(manifests=[d], batch_size=3, num_workers=0, block_size=8)
    ld = build_loader(cfg, 0, 1, CPU, "text")
    ld.device = META
    spy = CopySpy(monkeypatch)
    for wb in BatchStream(ld.sources, cfg, "text", 0, 1, 0, 0, False):
        out = ld._device_stage(wb)
        assert out["input_ids"].device == META and out["padding_mask"].device == META
    assert spy.calls and all(spy.calls)


def test_the_meta_check_catches_a_read_back(monkeypatch):
    # the test above can fail: a device stage that reads a value back is caught
    x = torch.zeros(3, device=META)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x.cpu(), lambda: bool(x.any())):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
    spy = CopySpy(monkeypatch)
    torch.ones(2).to(META)
    assert spy.calls == [False]


def test_resized_crops_takes_host_parameters_and_many_canvases():
    imgs, boxes, flips = random_batch(7, 10, grey_every=3)
    S = 24
    # host numpy parameters, and a canvas limit so small that most crops get their own canvas
    out = resized_crops(imgs, boxes.numpy(), flips.numpy(), S, "bicubic", max_pixels=1)
    for b in range(10):
        ref = reference_crop(imgs[b], boxes[b].tolist(), bool(flips[b]), S, "bicubic")
        assert (out[b] - ref).abs().max().item() < 1e-3
    assert resized_crops([], np.zeros((0, 4), np.int64), np.zeros(0, bool), S).shape == (0, 3, S, S)


def test_finish_works_in_place_on_float_and_keeps_uint8_inputs():
    aug = AugmentConfig()
    u8 = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    f32 = u8.float()
    a, b = finish(u8, None, aug, torch.float32), finish(f32, None, aug, torch.float32)
    assert torch.equal(a, b) and (u8 == 255).all()  # the uint8 input is untouched


def _state_run(ld, stop_after=None):
    """(keys, state after each hand-over) of one epoch, stopping early after `stop_after` batches."""
    keys, states = [], []
    for k, batch in enumerate(ld):
        keys.append(list(batch["key"]))
        states.append(ld.state_dict())
        if stop_after is not None and k + 1 == stop_after:
            break
    return keys, states


@pytest.mark.parametrize("workers", [0, 2])
def test_lookahead_hands_over_the_same_batches_and_exact_state(images, workers):
    cfg = DataConfig(manifests=[images], batch_size=3, num_workers=workers, shuffle_buffer=5,
                     augment=AugmentConfig(size=16, color_jitter=0.4), remainder="pad")
    inline = build_loader(cfg, 0, 1, CPU, "image")
    assert inline.lookahead == 0  # CPU default
    want_keys, want_states = _state_run(inline)
    ahead = build_loader(cfg, 0, 1, CPU, "image")
    ahead.lookahead = 2
    staged = []
    orig = ahead._device_stage
    ahead._device_stage = lambda wb: (staged.append(1), orig(wb))[1]
    got_keys, got_states = [], []
    for batch in ahead:
        got_keys.append(list(batch["key"]))
        got_states.append(ahead.state_dict())
        # consumed counts what was handed over, even though the thread staged more
        assert ahead.consumed == len(got_keys) * 3 or ahead.consumed == ahead.N
    assert got_keys == want_keys and got_states == want_states
    assert len(staged) == len(want_keys)
    assert ahead.state_dict()["epoch"] == 1 and ahead.consumed == 0


def test_lookahead_stops_early_and_resumes_exactly(images):
    cfg = DataConfig(manifests=[images], batch_size=2, num_workers=0, shuffle_buffer=5,
                     augment=AugmentConfig(size=16))
    full_keys, _ = _state_run(build_loader(cfg, 0, 1, CPU, "image"))
    ld = build_loader(cfg, 0, 1, CPU, "image")
    ld.lookahead = 2
    keys, states = _state_run(ld, stop_after=3)
    # the helper thread ended with the epoch's iterator (counted by name: threads of other tests
    # may start or end meanwhile)
    assert not [t for t in threading.enumerate() if t.name == "loader-device-stage"]
    assert states[-1]["consumed"] == 6 and ld.state_dict() == states[-1]
    resumed = build_loader(cfg, 0, 1, CPU, "image")
    resumed.lookahead = 1
    resumed.load_state_dict(states[-1])
    rest, _ = _state_run(resumed)
    assert keys + rest == full_keys


def test_lookahead_raises_worker_errors_in_the_caller(tmp_path):
    d = write_shards(str(tmp_path / "bad"), [3, 3], lambda k, s, i: {"jpg": jpeg_bytes(20, 20, i)})
    with open(tmp_path / "bad" / "train-000001.tar", "wb") as f:
        f.write(b"\x00" * 100 + b"garbage")
    ld = build_loader(DataConfig(manifests=[d], batch_size=2, num_workers=0, shuffle_buffer=0,
                                 augment=AugmentConfig(size=8)), 0, 1, CPU, "image")
    ld.lookahead = 1
    with pytest.raises(RuntimeError, match="train-000001.tar"):
        list(ld)


def test_corrupt_samples_are_counted_when_handed_over(tmp_path, caplog, monkeypatch):
    def members(key, s, i):
        return {"jpg": b"\xff\xd8 broken" if i == 1 else jpeg_bytes(20, 24, i), "cls": b"1"}
    d = write_shards(str(tmp_path / "c"), [6], members)
    cfg = DataConfig(manifests=[d], batch_size=3, num_workers=0, shuffle_buffer=0, augment=AugmentConfig(size=8))
    ld = build_loader(cfg, 0, 1, CPU, "image")
    ld.lookahead = 2
    it = iter(ld)
    with caplog.at_level(logging.WARNING):
        first = next(it)
        assert ld.corrupt_count == 1 and "s000_i0001" in caplog.text and first["is_pad"][1]
        next(it)
    assert ld.corrupt_count == 1
    it.close()


# ---------------------------------------------------------------------------------------------
# The decoder: batch bisection, error classes, sizes


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_one_bad_image_costs_a_few_calls_not_a_batch_of_single_decodes(monkeypatch):
    import torchvision.io

    datas = [_tensor(jpeg_bytes(16 + k % 5, 20, k)) for k in range(32)]
    good = datas[13].numpy().tobytes()
    datas[13] = _tensor(good[: len(good) // 2])
    calls = []
    real = torchvision.io.decode_jpeg

    def counting(inp, *a, **k):
        calls.append(len(inp) if isinstance(inp, list) else 1)
        return real(inp, *a, **k)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    imgs, errs = decode_cuda(datas, CPU)
    assert [b for b, e in enumerate(errs) if e] == [13] and errs[13].startswith("nvjpeg: ")
    assert all(imgs[b] is not None for b in range(32) if b != 13)
    assert len(calls) <= 2 * 5 + 1 and calls[0] == 32  # bisection: about 2 log2(32) calls


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_device_failures_are_raised_not_taken_for_corrupt_samples(monkeypatch):
    import torchvision.io

    datas = [_tensor(jpeg_bytes(16, 20, k)) for k in range(4)]
    for exc in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5"),
                RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 2")):
        def failing(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
        with pytest.raises(type(exc)):
            decode_cuda(datas, CPU)


@pytest.mark.parametrize("msg,device", [
    ("Error while decoding JPEG images: Failed to decode batch: 3", False),  # BAD_JPEG
    ("Error while decoding JPEG images: Failed to get image info: 2", False),
    ("Error while decoding JPEG images: Failed to decode jpeg stream: 10", False),  # INCOMPLETE_BITSTREAM
    ("Unknown chroma subsampling\nException raised from prepare_buffers at .../cuda/decode_jpegs_cuda.cpp", False),
    ("Error while decoding JPEG images: Failed to initialize batch decoding: 5", True),  # ALLOCATOR_FAILURE
    ("Error while decoding JPEG images: Failed to decode batch: 6", True),  # EXECUTION_FAILED
    ("Error while decoding JPEG images: Failed to synchronize CUDA stream: 2", True),
    ("CUDA error: an illegal memory access was encountered", True),
])
def test_decode_error_classes(msg, device):
    assert is_device_failure(RuntimeError(msg)) is device


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_decoded_size_is_checked_against_the_header():
    datas = [_tensor(jpeg_bytes(16, 20, k)) for k in range(3)]
    imgs, errs = decode_cuda(datas, CPU, [(16, 20), (16, 21), (16, 20)])
    assert errs[1].startswith("decoded size (16, 20) differs") and imgs[1] is None
    assert not errs[0] and not errs[2]


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (24, 16), (10, 200, 30, 5)).save(buf, format="JPEG")
    return buf.getvalue()


def _progressive_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(buf, format="JPEG", progressive=True)
    return buf.getvalue()


def test_both_paths_refuse_the_same_inputs_before_decoding(tmp_path, caplog, monkeypatch):
    """Cut files (no end-of-image marker; the hardware decoder may not notice) and kinds nvJPEG
    cannot decode are refused by the host-side check both paths share."""
    good = jpeg_bytes(20, 24, 1)
    cut = good[: len(good) - 40]  # scan data cut short: header intact, no EOI
    with pytest.raises(ValueError, match="end-of-image"):
        jpeg_size(cut)
    with pytest.raises(ValueError, match="cmyk"):
        jpeg_size(_cmyk_jpeg())
    assert jpeg_size(_progressive_jpeg()) == (16, 24)
    bad = {1: cut, 3: _cmyk_jpeg()}
    d = write_shards(str(tmp_path / "r"), [6], lambda k, s, i: {"jpg": bad.get(i, jpeg_bytes(20, 24, i)), "cls": b"0"})
    cfg = DataConfig(manifests=[d], batch_size=6, num_workers=0, shuffle_buffer=0, augment=AugmentConfig(size=8))
    refused = {}
    for gpu in (False, True):
        ld = build_loader(cfg, 0, 1, CPU, "image")
        if gpu:
            ld.gpu_decode = True
            monkeypatch.setattr(dec, "FAST_DCT", False)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            batch = next(iter(ld))
        refused[gpu] = sorted(k for k, p in zip([f"s000_i{i:04d}" for i in range(6)], batch["is_pad"].tolist()) if p)
        assert ld.corrupt_count == 2
    assert refused[False] == refused[True] == ["s000_i0001", "s000_i0003"]


def test_device_names_carry_their_index():
    assert canonical_device("cpu") == CPU
    if torch.cuda.is_available():
        assert canonical_device("cuda").index == torch.cuda.current_device()


def test_cpu_path_without_simplejpeg_is_a_one_line_config_error(images, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "simplejpeg" else real(name, *a))
    with pytest.raises(ValueError, match="decode_device.*simplejpeg"):
        build_loader(DataConfig(manifests=[images], num_workers=0), 0, 1, CPU, "image")
