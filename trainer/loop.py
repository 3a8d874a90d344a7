"""The training loop: a Trainer that owns the distributed setup, optimiser, schedule, precision,
gradient accumulation, checkpoints and logs, and drives one task (trainer.tasks).

Steps are optimiser steps; one step consumes `grad_accum` batches from every rank. Every rank
gets the same number of batches (the loader's contract), so DDP never waits on a missing rank.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import Checkpointer, rng_state, set_rng_state
from trainer.config import Config, save_config
from trainer.errors import UserError
from trainer.logs import RunLogger, peak_memory_bytes
from trainer.tasks.image_kd import ImageKDTask, no_weight_decay

TASKS = {"image_kd": ImageKDTask}


def resolve_loader_factory(spec: str):
    """'package.module:function' -> the function (the real one is trainer.data:build_loader)."""
    mod_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr or "build_loader")
    except (ImportError, AttributeError) as e:
        raise UserError(f"config key 'loader': cannot import {spec!r} ({e})") from None


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    """lr factor for step s: linear 0 -> 1 over `warmup` steps, then cosine down to min_ratio."""

    def factor(s: int) -> float:
        if s < warmup:
            return s / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Builds everything from a Config; `train()` runs to the last step; `close()` tears down.

    `loader_factory` replaces `cfg.loader` (benchmarks hand in a synthetic loader object)."""

    def __init__(self, cfg: Config, loader_factory=None):
        self.cfg = cfg
        self._init_distributed()
        self.out_dir = Path(cfg.out_dir)
        self._prepare_out_dir()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.seed)

        self.task = TASKS[cfg.task](cfg, self.device)
        if cfg.data.augment.size != self.task.img_size:
            raise UserError(f"config key 'data.augment.size': {cfg.data.augment.size} px, but the teacher "
                            f"expects {self.task.img_size} px images")
        self.student: nn.Module = self.task.student  # unwrapped: what checkpoints hold
        self.model: nn.Module = self.student
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)

        build_loader = loader_factory or resolve_loader_factory(cfg.loader)
        try:
            self.loader = build_loader(cfg.data, self.rank, self.world_size, self.device, self.task.data_kind)
        except (FileNotFoundError, ValueError) as e:  # the loader's own checks of paths and data options
            raise UserError(f"data: {e}") from None
        sched = cfg.schedule
        self.steps_per_epoch = len(self.loader) // sched.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"the loader gives {len(self.loader)} batches per epoch, fewer than one "
                            f"optimiser step (grad_accum {sched.grad_accum}): use less data.batch_size")
        self.total_steps = sched.max_steps or max(1, round(sched.epochs * self.steps_per_epoch))
        self.global_batch = cfg.data.batch_size * self.world_size * sched.grad_accum

        self.optimizer = self._build_optimizer()
        warmup = sched.warmup_steps if sched.warmup_steps >= 0 else int(sched.warmup_frac * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(warmup, self.total_steps, sched.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self._saved_step = -1

        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        self.checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, self.is_main)
        if self.is_main:  # a bad checkpoint.dir should fail now, not after hours of training
            try:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create checkpoint.dir {ckpt_dir}: {e.strerror}") from None
        self.logger = RunLogger(self.out_dir, cfg.logging, self.is_main)
        self._resume()

    # -- setup ------------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = self.cfg.device
        use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise UserError("config key 'device': cuda requested but no CUDA device is available")
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
        self.is_main = self.rank == 0

    def _prepare_out_dir(self) -> None:
        if self.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create out_dir {self.out_dir}: {e.strerror}") from None
            save_config(self.cfg, self.out_dir / "config.yaml")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        ocfg = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p) else decay).append(p)
        lr = ocfg.lr * self.global_batch / 256 if ocfg.scale_lr else ocfg.lr
        self.base_lr = lr
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=ocfg.betas, eps=ocfg.eps,
            # one fused kernel for the whole update on GPU; CPU keeps the default implementation
            fused=True if self.device.type == "cuda" else None,
        )

    # -- checkpoints ----------------------------------------------------------------------

    def _gather_rng(self) -> list:
        states = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states[0] = rng_state()
        return states

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": self._gather_rng(),
        }

    def save(self) -> None:
        state = self.state_dict()  # every rank: the RNG gather is collective
        path = self.checkpointer.save(state, self.step)
        self._saved_step = self.step
        if path is not None:
            self.logger.info(f"checkpoint: {path}")

    def _resume_path(self) -> Path | None:
        """Which checkpoint to start from (None: fresh), decided on rank 0's view of the files."""
        resume = self.cfg.resume
        if not resume:
            if self.checkpointer.latest() is not None:
                raise UserError(f"{self.checkpointer.dir} already holds checkpoints: pass resume=auto to "
                                f"continue that run, or choose another out_dir")
            return None
        path = self.checkpointer.latest() if resume == "auto" else Path(resume)
        if path is None:
            self.logger.info(f"resume=auto: no checkpoint in {self.checkpointer.dir}, starting fresh")
        elif not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        return path

    def _resume(self) -> None:
        # rank 0 decides and tells the others, so every rank resumes from the same file (or fails
        # with the same message) even if their view of the directory differs
        decision: list = [None]
        if self.is_main:
            try:
                path = self._resume_path()
                decision = [("path", None if path is None else str(path))]
            except UserError as e:
                decision = [("error", str(e))]
        if self.world_size > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, value = decision[0]
        if kind == "error":
            raise UserError(value)
        if value is None:
            return
        path = Path(value)
        state = Checkpointer.load(path)
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:  # e.g. another data.seed or changed manifests: the order would differ
            raise UserError(f"cannot resume the data stream from {path}: {e}") from None
        self.step = self._saved_step = state["step"]
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            # another process count: per-rank streams cannot carry over; derive fresh ones
            torch.manual_seed(self.cfg.seed + 1000 * self.step + self.rank)
        if state["total_steps"] != self.total_steps:
            self.logger.info(f"resume: the run had {state['total_steps']} steps in total, now {self.total_steps}"
                             f" (different global batch or data?): the schedule follows the new total")
        self.logger.info(f"resumed from {path} at step {self.step} (saved by {state['world_size']} "
                         f"process(es), now {self.world_size})")

    # -- training -------------------------------------------------------------------------

    def _optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _global_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def _check_finite(self, loss_sum: torch.Tensor, n: int) -> float:
        """Mean loss over the last n micro-batches of all ranks; a NaN/inf anywhere stops the run
        on every rank together (each rank sees the same reduced value)."""
        mean = self._global_mean(loss_sum).item() / max(n, 1)
        if not math.isfinite(mean):
            raise UserError(f"loss is {mean} at step {self.step}: stopping (try a lower optim.lr, "
                            f"optim.grad_clip, or precision=fp32)")
        return mean

    def train(self) -> None:
        cfg = self.cfg
        accum = cfg.schedule.grad_accum
        log_every, ckpt_every = cfg.logging.every_steps, cfg.checkpoint.every_steps
        self.logger.info(f"training {self.total_steps} steps from step {self.step}: global batch "
                         f"{self.global_batch}, lr {self.base_lr:.3e}, {self.world_size} process(es) on "
                         f"{self.device.type}, {self.steps_per_epoch} steps per epoch")
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        n_micro, micro, wait, t_last, step_last = 0, 0, 0.0, time.perf_counter(), self.step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < self.total_steps:
            batches = iter(self.loader)
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait += time.perf_counter() - t0
                if batch is None:
                    break  # end of epoch; the loader moved on to the next one
                micro += 1
                last = micro % accum == 0
                # gradient all-reduce only on the micro-batch that completes a step
                sync = self.model.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()
                with sync:
                    losses = self.task.loss(self.model, batch)
                    self.scaler.scale(losses["loss"] / accum).backward()
                loss_sum += losses["loss"].detach().float()
                n_micro += 1
                if not last:
                    continue
                self._optimizer_step()
                if self.step % log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    self.logger.log({
                        "step": self.step, "total_steps": self.total_steps,
                        "loss": self._check_finite(loss_sum, n_micro),
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": (self.step - step_last) * self.global_batch / (now - t_last),
                        "data_wait": wait / (now - t_last),
                        "peak_mem_bytes": peak_memory_bytes(self.device),
                    })
                    loss_sum.zero_()
                    n_micro, wait, t_last, step_last = 0, 0.0, time.perf_counter(), self.step
                if ckpt_every and self.step % ckpt_every == 0 and self.step < self.total_steps:
                    self._check_finite(loss_sum, n_micro)  # never checkpoint NaN weights
                    self.save()
        self._check_finite(loss_sum, n_micro)
        if self._saved_step != self.step:  # same answer on every rank: save() is collective
            self.save()
        if self.world_size > 1:
            # leave together: a rank tearing down gloo while rank 0 still writes the checkpoint
            # aborted now and then ("terminate called without an active exception")
            dist.barrier()

    def close(self) -> None:
        self.logger.close()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
