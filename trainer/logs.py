"""Run logs: one console line per logging step, the same record as JSONL, and TensorBoard
scalars when the `tensorboard` package is installed. Only rank 0 writes; other ranks get a
logger that does nothing, so callers never branch on rank."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from trainer.config import LoggingConfig


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on the GPU, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_record(r: dict) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}"]
    parts += [f"{k} {v:.5f}" for k, v in r.items() if k.startswith("loss")]
    parts.append(f"lr {r['lr']:.3e}")
    parts.append(f"{r['samples_per_s']:.1f} samples/s")
    parts.append(f"data-wait {100 * r['data_wait']:.1f}%")
    parts.append(f"peak mem {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    return " | ".join(parts)


class RunLogger:
    def __init__(self, out_dir: Path, cfg: LoggingConfig, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if cfg.jsonl:
            self.jsonl = open(out_dir / "log.jsonl", "a", buffering=1)
        if cfg.tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                if cfg.tensorboard == "on":
                    self.info("tensorboard=on but the tensorboard package is not installed; skipping it")
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"))

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        print(format_record(record), flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "total_steps", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
