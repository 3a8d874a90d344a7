"""Mixed precision in one place: the autocast context every task and evaluation uses, and the
check that falls back to float32 (with one log line) where a dtype's autocast does not work on a
device, so the three tasks behave the same on a CPU, an old GPU or a new one."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, dtype_name: str):
    """Autocast to the named dtype, or nothing for fp32."""
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_works(device: torch.device, dtype_name: str) -> bool:
    """Whether autocast in `dtype_name` works on `device`. Checked by running a matmul, a
    LayerNorm and attention under it: where a PyTorch build lacks the dtype for a device,
    autocast warns and disables itself, or the op raises."""
    if DTYPES[dtype_name] == torch.float32:
        return True
    if not torch.amp.is_autocast_available(device.type):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.inference_mode(), autocast(device, dtype_name):
                x = torch.ones(1, 2, 4, 8, device=device)
                y = torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (8,)), torch.ones(8, 8, device=device))
                y = torch.nn.functional.scaled_dot_product_attention(y, y, y)
        return y.dtype == DTYPES[dtype_name] and bool(torch.isfinite(y).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def usable_autocast_dtype(device: torch.device, dtype_name: str, key: str = "", who: str = "model") -> str:
    """`dtype_name` if autocast in it works on `device`, else "float32"; with `key` (the config
    key that asked for it) the fallback is logged, naming `who` runs in float32."""
    if autocast_works(device, dtype_name):
        return dtype_name
    if key:
        log.warning("%s %s: autocast in it does not work on %s here; the %s runs in float32", key, dtype_name,
                    device.type, who)
    return "float32"
