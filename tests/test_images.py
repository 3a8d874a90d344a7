"""Image checks: what is kept byte for byte, what is re-encoded, what is rejected and why."""

import io

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from imagenet_fixtures import bomb_png, jpeg_bytes, png_bytes, special_images
from shardify.images import normalise_image, parse_jpeg_header
from shardify.records import Reject


def test_rgb_jpeg_kept_byte_for_byte():
    data = jpeg_bytes(1, size=(50, 30))
    out, meta = normalise_image(data)
    assert out == data
    assert meta == {"format": "jpeg", "width": 50, "height": 30}


def test_progressive_jpeg_kept():
    img = Image.open(io.BytesIO(jpeg_bytes(2)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=True)
    out, meta = normalise_image(buf.getvalue())
    assert out == buf.getvalue() and "reencoded_from" not in meta


def test_grayscale_jpeg_kept_and_decodes_to_three_channels():
    data = jpeg_bytes(3, size=(33, 21), mode="L")
    out, meta = normalise_image(data)
    assert out == data
    assert parse_jpeg_header(out).components == 1
    decoded = decode_jpeg(torch.frombuffer(bytearray(out), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert decoded.shape == (3, 21, 33)


@pytest.mark.parametrize("kind", ["cmyk", "png"])
def test_cmyk_and_png_in_disguise_become_rgb_jpegs(kind):
    data = special_images()[0][2] if kind == "cmyk" else png_bytes(5)
    out, meta = normalise_image(data)
    assert out[:2] == b"\xff\xd8" and out != data
    assert meta["reencoded_from"] == ("cmyk-jpeg" if kind == "cmyk" else "png")
    assert parse_jpeg_header(out).components == 3
    decoded = decode_jpeg(torch.frombuffer(bytearray(out), dtype=torch.uint8))
    assert decoded.shape[0] == 3
    assert (decoded.shape[2], decoded.shape[1]) == (meta["width"], meta["height"])


def test_cmyk_colours_survive_reencoding():
    # A CMYK JPEG of a mid-grey-ish RGB image must come back close to it, not inverted.
    rgb = Image.new("RGB", (32, 32), (200, 120, 40))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG", quality=95)
    out, _ = normalise_image(buf.getvalue())
    pixel = Image.open(io.BytesIO(out)).convert("RGB").getpixel((16, 16))
    assert all(abs(a - b) < 12 for a, b in zip(pixel, (200, 120, 40))), pixel


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (jpeg_bytes(4)[:300], "truncated"),
    (jpeg_bytes(4)[:-400], "truncated"),
    (b"GIF89a but not really", "unreadable"),
    (b"\x00" * 100, "unreadable"),
    (bomb_png(), "too_many_pixels"),
])
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Reject) as exc:
        normalise_image(data)
    assert exc.value.reason == reason


def test_pixel_limit_applies_to_jpegs_from_the_header():
    with pytest.raises(Reject) as exc:
        normalise_image(jpeg_bytes(5, size=(100, 100)), max_pixels=9999)
    assert exc.value.reason == "too_many_pixels" and "100x100" in exc.value.detail
