"""The training loop: a Trainer that owns the distributed setup, optimiser, schedule, precision,
gradient accumulation, validation, checkpoints and logs, and drives one task (trainer.tasks).

The loop knows no model, modality or loss: the task (trainer/tasks/base.py) builds teacher and
student, says which loader kind it needs, gives the parameter groups and returns named losses.

Steps are optimiser steps; one step consumes `grad_accum` batches from every rank. Every rank
gets the same number of batches (the loader's contract), so DDP never waits on a missing rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import CHECKPOINT_FORMAT, Checkpointer, rng_state, set_rng_state
from trainer.config import Config, config_text, task_class, to_dict
from trainer.errors import UserError
from trainer.logs import RunLogger, peak_memory_bytes
from trainer.preflight import preflight
from trainer.resume_check import check_resume, choose_checkpoint, data_fingerprint
from trainer.rundir import LocalStore, RunFiles
from trainer.runlock import RunLock, remove_stale_tmp
from trainer.signals import STOPPED_EXIT_CODE, GracefulStop


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

    `loader_factory(data_cfg, rank, world_size, device, kind)` replaces trainer.data.build_loader
    (benchmarks hand in a synthetic loader, tests a fault-injecting one). Nothing is written to
    out_dir before every part is built and the resume decision is made, so a refused run leaves
    the run directory as it was.

    `stop` (trainer/signals.py) is where SIGTERM/SIGUSR1/SIGINT land: the CLI installs it before
    building anything; without one, `train()` installs its own for the loop. After `train()`,
    `stopped` names why it stopped early (None: it ran to the last step)."""

    def __init__(self, cfg: Config, loader_factory=None, stop: GracefulStop | None = None):
        self.cfg = cfg
        self._init_distributed()
        self.stop = stop or GracefulStop(verbose=self.is_main)
        self.stopped: str | None = None
        self.run_lock: RunLock | None = None  # rank 0 holds out_dir's lock from _prepare_out_dir to close()
        # every input file, before anything is built or written (`--dry-run` runs the same); a
        # hand-made loader (benchmarks, fault injection) brings its own data
        checked = preflight(cfg, data=loader_factory is None)
        self.data_fingerprint = (data_fingerprint(checked.manifests, cfg.data.split)
                                 if checked.manifests else None)
        self.files = RunFiles(cfg.out_dir)  # local, or s3:// / gs:// (trainer/rundir.py)
        self.out_dir = self.files.local  # where the logs are written (a staging dir when remote)
        self.files.check()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.seed)

        self.task = task_class(cfg.task)(cfg, self.device)
        self.student: nn.Module = self.task.student  # unwrapped: what checkpoints hold
        self.model: nn.Module = self.student
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)

        if loader_factory is None:
            from trainer.data import build_loader as loader_factory
        self.loader = self._build_loader(loader_factory, cfg.data)
        self.val_loader = None
        if cfg.data.val_split:
            # the validation transform, every sample once: padded repeats are marked (is_pad)
            val_cfg = replace(cfg.data, split=cfg.data.val_split, remainder="pad",
                              augment=replace(cfg.data.augment, train=False))
            self.val_loader = self._build_loader(loader_factory, val_cfg)
            self._val_start = self.val_loader.state_dict()
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
        self.best_val: float | None = None  # lowest validation loss so far (checkpoints/best.pt)

        ckpt_dir = cfg.checkpoint.dir or f"{cfg.out_dir.rstrip('/')}/checkpoints"
        self.checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, self.is_main)
        self.logger = RunLogger(self.out_dir, cfg.logging, self.is_main)
        self._resume()
        self._prepare_out_dir()

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
        # the per-step stop vote is a CPU all-reduce: on NCCL a side gloo group, so reading the
        # vote never waits for the GPU
        self._vote_group = None
        if self.world_size > 1 and dist.get_backend() != "gloo":
            self._vote_group = dist.new_group(backend="gloo")
        self.is_main = self.rank == 0

    def _prepare_out_dir(self) -> None:
        """Take the run lock, create the run and checkpoint directories, remove stale temporary
        files, write the resolved config and open the logs: only once everything was built and
        the resume decision made. Rank 0 does it; every rank gets its one-line error."""
        error = None
        if self.is_main:
            try:
                self._claim_out_dir()
            except UserError as e:
                error = str(e)
        error = self._from_main(error)
        if error:
            raise UserError(error)

    def _claim_out_dir(self) -> None:
        if not self.files.remote:  # a local directory: one run at a time (trainer/runlock.py)
            self.run_lock = RunLock(self.out_dir).acquire()
        try:
            self.files.prepare()
            store = self.checkpointer.store
            if isinstance(store, LocalStore):
                try:
                    store.dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UserError(f"cannot create checkpoint.dir {store.dir}: {e.strerror or e}") from None
                stale = remove_stale_tmp(self.out_dir, store.dir)
                if stale:
                    self.logger.info(f"removed {len(stale)} temporary file(s) left by killed writers ("
                                     f"{sum(n for _, n in stale) / 2**20:.1f} MiB): "
                                     f"{', '.join(p.name for p, _ in stale)}")
            try:
                self.files.write_text("config.yaml", config_text(self.cfg))
                self.logger.open(resumed_step=self.step)
            except OSError as e:
                raise UserError(f"cannot write {e.filename or self.out_dir}: {e.strerror or e}") from None
        except BaseException:
            if self.run_lock is not None:
                self.run_lock.release(remove_created=True)
            raise

    def _build_loader(self, factory, data_cfg):
        try:
            return factory(data_cfg, self.rank, self.world_size, self.device, self.task.data_kind)
        except (FileNotFoundError, ValueError) as e:  # the loader's own checks of paths and data options
            raise UserError(f"data: {e}") from None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        ocfg = self.cfg.optim
        groups = [g for g in self.task.param_groups(ocfg.weight_decay) if g["params"]]
        lr = ocfg.lr * self.global_batch / 256 if ocfg.scale_lr else ocfg.lr
        self.base_lr = lr
        return torch.optim.AdamW(
            groups, lr=lr, betas=ocfg.betas, eps=ocfg.eps,
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
            # self-description: what `trainer export` and evaluation need without the teacher
            "format": CHECKPOINT_FORMAT,
            "task": self.cfg.task,
            "config": to_dict(self.cfg),
            "student_arch": self.task.student_arch(),
            "task_state": self.task.state_dict(),
            "data": self.data_fingerprint,  # what the manifests held: a resume must read the same
            "best_val": self.best_val,
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

    def _from_main(self, value):
        """Rank 0's `value` on every rank (a decision or an error message only rank 0 can know)."""
        if self.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _write_checkpoint(self, write, resumable: bool = True) -> Path | None:
        """Rank 0 writes (`write()`); every rank stops together with its one-line error (disk
        full, ...), and after a good resumable write when log.jsonl could not be written
        (trainer/logs.py)."""
        path, error = None, None
        try:
            path = write()
        except UserError as e:
            error = str(e)
        if error is None and resumable and self.logger.failure:
            error = (f"{self.logger.failure}: stopped after writing checkpoint {path}; "
                     f"free space, then continue with resume=auto")
        error = self._from_main(error)
        if error:
            raise UserError(error)
        return path

    def save(self) -> None:
        state = self.state_dict()  # every rank: the RNG gather is collective
        path = self._write_checkpoint(lambda: self.checkpointer.save(state, self.step))
        self._saved_step = self.step
        if path is not None:
            self.logger.info(f"checkpoint: {path}")
            self.files.sync()  # a remote run's logs follow its checkpoints

    def _resume_path(self) -> tuple[Path | str | None, dict | None]:
        """Which checkpoint to start from (None: fresh) and, when this process already read it,
        its state; decided on rank 0's view of the files (trainer/resume_check.py)."""
        return choose_checkpoint(self.checkpointer, self.cfg.resume, self.logger.info)

    def _resume(self) -> None:
        # rank 0 decides and tells the others, so every rank resumes from the same file (or fails
        # with the same message) even if their view of the directory differs
        decision: list = [None]
        state = None
        if self.is_main:
            try:
                path, state = self._resume_path()
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
        path = value if "://" in value else Path(value)
        if state is None:
            state = Checkpointer.load(path)
        self._restore(path, state)

    def _restore(self, path, state: dict) -> None:
        """Continue from a loaded checkpoint, after checking that it is the same run."""
        if state.get("task", self.cfg.task) != self.cfg.task:
            raise UserError(f"cannot resume from {path}: it was written by task {state['task']!r}, "
                            f"this config runs {self.cfg.task!r}")
        notes = check_resume(path, state, to_dict(self.cfg), self.task.student_arch(), self.data_fingerprint,
                             extra=type(self.task).resume_may_change, force=self.cfg.resume == "force")
        try:
            self.student.load_state_dict(state["model"])
        except RuntimeError as e:  # resume=force with another shape
            first = str(e).strip().splitlines()
            raise UserError(f"cannot resume from {path}: its weights do not fit this student "
                            f"({first[1].strip() if len(first) > 1 else first[0][:200]})") from None
        try:
            self.task.load_state_dict(state.get("task_state", {}))
        except ValueError as e:
            raise UserError(f"cannot resume the task state from {path}: {e}") from None
        self.best_val = state.get("best_val")
        self._load_optimizer(state)
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved without fp16
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
        for note in notes:
            self.logger.info(note)
        if state["total_steps"] != self.total_steps:
            self.logger.info(f"resume: the run had {state['total_steps']} steps in total, now {self.total_steps}"
                             f" (different global batch or data?): the schedule follows the new total")
        self.logger.info(f"resumed from {path} at step {self.step} (saved by {state['world_size']} "
                         f"process(es), now {self.world_size})")

    def _load_optimizer(self, state: dict) -> None:
        """The optimiser's moments and the schedule's position from the checkpoint; its
        hyper-parameters (lr, weight decay, betas, eps) from this config, with the lr scaled to
        this run's total batch and the schedule recomputed from that base lr."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, fresh):
            group.update(hyper)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [g["initial_lr"] for g in fresh]
        lrs = [base * factor(self.scheduler.last_epoch)
               for base, factor in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs  # what get_last_lr() reports (and the log shows)

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

    def _mean_losses(self, sums: dict[str, torch.Tensor], n: int, prefix: str = "") -> dict[str, float]:
        """Means over the last n micro-batches of all ranks, one all-reduce for every name; a
        NaN/inf anywhere stops the run on every rank together (all see the same values)."""
        if not sums:
            return {}
        names = sorted(sums, key=lambda k: (k != "loss", k))  # the optimised loss first
        means = (self._global_mean(torch.stack([sums[k] for k in names])) / max(n, 1)).tolist()
        out = {prefix + k: v for k, v in zip(names, means)}
        bad = [f"{k} is {v}" for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise UserError(f"{', '.join(bad)} at step {self.step}: stopping (try a lower optim.lr, "
                            f"optim.grad_clip, or precision=fp32)")
        return out

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v.clone()

    def _stop_agreed(self) -> bool:
        """The stop vote at a step boundary, one small CPU all-reduce: every rank stops at the
        same step if any rank was asked to (SLURM may signal one node before another)."""
        asked = self.stop.requested is not None
        if self.world_size == 1:
            return asked
        vote = torch.tensor([int(asked)], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._vote_group)
        return bool(vote.item())

    def _stop_here(self, sums: dict[str, torch.Tensor], n_micro: int) -> None:
        """End the run early at this step boundary: one checkpoint (unless this step has one)."""
        self._mean_losses(sums, n_micro)  # never checkpoint NaN weights
        self.stopped = self.stop.requested or "a stop request on another rank"
        if self._saved_step != self.step:
            self.save()
        self.logger.info(f"stopped by {self.stopped} at step {self.step} of {self.total_steps} with a checkpoint "
                         f"in {self.checkpointer.dir}: exit status {STOPPED_EXIT_CODE}, continue with resume=auto")

    def train(self) -> None:
        """Run to the last step, or to the step boundary where a stop was agreed (`stopped`)."""
        with self.stop.installed_for():
            self._train()
        if self.world_size > 1:
            # leave together: a rank tearing down gloo while rank 0 still writes the checkpoint
            # aborted now and then ("terminate called without an active exception")
            dist.barrier()

    def _train(self) -> None:
        cfg = self.cfg
        if self.step >= self.total_steps:  # a resume of a finished run: nothing to train or validate
            self.logger.info(f"the run is finished: step {self.step} of {self.total_steps} (raise "
                             f"schedule.max_steps or schedule.epochs to train on)")
            return
        accum = cfg.schedule.grad_accum
        log_every, ckpt_every = cfg.logging.every_steps, cfg.checkpoint.every_steps
        val_every = cfg.validation.every_steps if self.val_loader is not None else 0
        self.logger.info(f"training {self.total_steps} steps from step {self.step}: task {cfg.task}, global batch "
                         f"{self.global_batch}, lr {self.base_lr:.3e}, {self.world_size} process(es) on "
                         f"{self.device.type}, {self.steps_per_epoch} steps per epoch")
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n_micro, micro, wait, t_last, step_last = 0, 0, 0.0, time.perf_counter(), self.step
        t_start, step_start = t_last, self.step
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
                self._accumulate(sums, losses)
                n_micro += 1
                if not last:
                    continue
                self._optimizer_step()
                self.task.after_step(self.step)
                if self.step % log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = (self.step - step_start) / max(now - t_start, 1e-9)  # steps/s of this process
                    self.logger.log({
                        "step": self.step, "total_steps": self.total_steps,
                        **self._mean_losses(sums, n_micro),
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": (self.step - step_last) * self.global_batch / (now - t_last),
                        "data_wait": wait / (now - t_last),
                        "peak_mem_bytes": peak_memory_bytes(self.device),
                        "elapsed_s": now - t_start,
                        "eta_s": (self.total_steps - self.step) / rate if rate > 0 else None,
                    })
                    sums = {}
                    n_micro, wait, t_last, step_last = 0, 0.0, time.perf_counter(), self.step
                # a stop asked for during setup lands here too, after the first step
                if self.step < self.total_steps and self._stop_agreed():
                    self._stop_here(sums, n_micro)  # before validating: the grace time is short
                    return
                if val_every and self.step % val_every == 0 and self.step < self.total_steps:
                    self.validate()
                if ckpt_every and self.step % ckpt_every == 0 and self.step < self.total_steps:
                    self._mean_losses(sums, n_micro)  # never checkpoint NaN weights
                    self.save()
        self._mean_losses(sums, n_micro)
        if self.val_loader is not None:
            self.validate()
        if self._saved_step != self.step:  # same answer on every rank: save() is collective
            self.save()

    def validate(self) -> dict[str, float]:
        """The task's losses on the validation split (the whole split, or validation.max_batches),
        logged with a val_ prefix. A new lowest val_loss writes checkpoints/best.pt."""
        max_batches = self.cfg.validation.max_batches
        self.val_loader.load_state_dict(self._val_start)  # every validation reads the same samples
        self.student.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in self.val_loader:
                self._accumulate(sums, self.task.loss(self.student, batch))
                n += 1
                if max_batches and n >= max_batches:
                    break
        self.model.train()
        means = self._mean_losses(sums, n, prefix="val_")
        improved = self.best_val is None or means["val_loss"] < self.best_val
        if improved:
            self.best_val = means["val_loss"]
        self.logger.log_val({"step": self.step, "total_steps": self.total_steps, **means,
                             "val_batches": n, "val_s": time.perf_counter() - t0, "best": improved})
        if improved:
            state = self.state_dict()  # every rank: the RNG gather is collective
            path = self._write_checkpoint(lambda: self.checkpointer.save_best(state), resumable=False)
            if path is not None:
                self.logger.info(f"best checkpoint (val_loss {self.best_val:.5f}): {path}")
        return means

    def close(self) -> None:
        self.logger.close()
        if self.is_main:
            self.files.sync()
        self.files.close()
        if self.run_lock is not None:
            self.run_lock.release()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
