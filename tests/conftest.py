"""Shared test setup: tests never touch the network, and helper modules in tests/ import."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def backend(request, monkeypatch):
    """The CPU image path's decoder, by indirect parametrisation: 'region' (libturbojpeg 3's
    cropping region; skipped, with the reason, where it cannot be loaded) or 'whole' (simplejpeg)."""
    from trainer.data import decode as dec
    from trainer.data import tjregion

    if request.param == "region" and tjregion.load() is None:
        pytest.skip(f"region decoder unavailable: {tjregion.why_not()}")
    monkeypatch.setattr(dec, "REGION_DECODE", request.param == "region")
    return request.param
