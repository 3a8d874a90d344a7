"""What a resume may change, and the refusal of everything else.

A resume continues the same run: the same task, model, data (manifests, their order and their
shards' content), weights and transforms. What only says how long, how fast or where it runs may
change: the length (`schedule.max_steps`, `schedule.epochs`), logging, validation and
checkpoint cadence, the number of processes and the per-process batch, workers, device,
precision, and the optimiser's hyper-parameters (lr, weight decay, betas, eps, clipping, the
warmup and floor of the schedule), which follow the new config: the loop recomputes the
schedule from the new base lr and the new total batch (trainer/loop.py).

Any other difference, compared key by key between the config saved in the checkpoint and the
new one, is refused with one line naming the dotted key and its old and new value, before
anything is written. The manifests are compared by what they hold: each manifest's dataset,
split and shard list (name, samples, sha256), in order, so moved data (another path, the same
shards) may resume, and a re-written shard may not. `resume=force` turns the refusals into log
lines (the model's shape must still fit its weights).
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.errors import UserError

# dotted keys (or section prefixes ending in ".") a resume may change
MAY_CHANGE = (
    "out_dir", "resume", "device", "precision", "compile", "deterministic",
    "data.batch_size", "data.num_workers", "data.decode_device", "data.output_dtype", "data.val_split",
    "optim.", "schedule.epochs", "schedule.max_steps", "schedule.warmup_frac", "schedule.warmup_steps",
    "schedule.min_lr_ratio", "schedule.grad_accum",
    "checkpoint.", "logging.", "validation.",
    "teacher.dtype",  # the teacher's forward precision
)
# compared by content (data_fingerprint), not by the configured paths
BY_CONTENT = ("data.manifests",)


def flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def may_change(key: str, extra: tuple[str, ...] = ()) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in (*MAY_CHANGE, *extra))


def data_fingerprint(manifests, split: str) -> list[dict]:
    """Per manifest, in order: what it holds for `split` (trainer.preflight.Manifest list)."""
    out = []
    for m in manifests:
        shards = m.doc["splits"].get(split, {}).get("shards", [])
        out.append({"manifest": m.path, "dataset": m.doc.get("dataset"), "split": split,
                    "shards": [[s["name"], int(s["samples"]), s.get("sha256") or ""] for s in shards]})
    return out


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def config_differences(old: dict, new: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """One line per key that differs and may not change, in key order. Keys only one side has
    (an option a newer version added or removed) are not compared: the checkpoint cannot say
    what the run used for them."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) & set(b)):
        if may_change(key, extra) or any(key == c or key.startswith(c + "[") for c in BY_CONTENT):
            continue
        if a[key] != b[key]:
            out.append(f"config key '{key}' was {_short(a[key])}, now {_short(b[key])}")
    return out


def data_differences(old: list[dict] | None, new: list[dict] | None, old_paths: list, new_paths: list) -> list[str]:
    """What changed in the data: manifests added, removed, reordered, or a shard's content."""
    if old is None or new is None:  # a checkpoint from before fingerprints, or a hand-made loader: the paths
        if list(old_paths) != list(new_paths):
            return [f"config key 'data.manifests' was {_short(list(old_paths))}, now {_short(list(new_paths))}"]
        return []

    def ident(fp):
        return fp["dataset"], fp["split"], [tuple(s) for s in fp["shards"]]

    old_ids, new_ids = [ident(f) for f in old], [ident(f) for f in new]
    if old_ids == new_ids:
        return []
    if len(old) != len(new) or sorted(map(repr, old_ids)) == sorted(map(repr, new_ids)):
        what = "reordered" if len(old) == len(new) else "another list"
        return [f"config key 'data.manifests' was {_short(list(old_paths))}, now {_short(list(new_paths))} ({what})"]
    for i, (o, n) in enumerate(zip(old, new)):
        if ident(o) == ident(n):
            continue
        key = f"config key 'data.manifests[{i}]' ({n['manifest']})"
        if (o["dataset"], o["split"]) != (n["dataset"], n["split"]):
            return [f"{key}: dataset {o['dataset']!r} split {o['split']!r} was trained, now "
                    f"{n['dataset']!r} split {n['split']!r}"]
        old_shards = {s[0]: s for s in o["shards"]}
        for s in n["shards"]:
            before = old_shards.get(s[0])
            if before is None:
                return [f"{key}: shard {s[0]} is new ({len(o['shards'])} shards before, {len(n['shards'])} now)"]
            if tuple(before) != tuple(s):
                return [f"{key}: shard {s[0]} changed (samples {before[1]}, sha256 {before[2][:12] or '-'} "
                        f"before; samples {s[1]}, sha256 {s[2][:12] or '-'} now)"]
        return [f"{key}: {len(o['shards'])} shards before, {len(n['shards'])} now"]
    return []


def check_resume(path, state: dict, new_config: dict, new_arch: dict, fingerprint: list[dict] | None,
                 extra: tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Refuse (UserError, one line) a resume from `state` that would change the run, unless
    `force`; returns the differences (to be logged) when forced, and the allowed changes."""
    old_config = state.get("config") or {}
    diffs = config_differences(old_config, new_config, extra)
    old_arch = state.get("student_arch")
    if old_arch is not None:
        a, b = flatten(old_arch, "student_arch."), flatten(new_arch, "student_arch.")
        diffs += [f"the student's shape '{k}' was {_short(a.get(k))}, now {_short(b.get(k))}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    old_paths = (old_config.get("data") or {}).get("manifests", [])
    new_paths = new_config["data"]["manifests"]
    diffs += data_differences(state.get("data"), fingerprint, old_paths, new_paths)
    if diffs and not force:
        more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
        raise UserError(f"cannot resume from {path}: {diffs[0]}{more}; that changes the run: train into "
                        f"a new out_dir, or pass resume=force to continue anyway")
    changed = [k for k in sorted(set(flatten(old_config)) | set(flatten(new_config)))
               if k != "resume" and may_change(k, extra)
               and flatten(old_config).get(k) != flatten(new_config).get(k)]
    notes = [f"resume=force: {d}" for d in diffs]
    if changed:
        notes.append(f"resume: changed since the checkpoint: {', '.join(changed)}")
    return notes


def choose_checkpoint(checkpointer, resume: str, say: Callable[[str], None]) -> tuple[object, dict | None]:
    """(path, its state when already read) of the checkpoint a run with `resume` starts from, or
    (None, None) for a fresh start. resume=auto (and force) takes the newest checkpoint that
    loads, saying through `say` which newer ones it skipped and why; an explicit path is taken
    as it is (no fallback: the user chose it). A fresh run refuses a directory with checkpoints."""
    from trainer.checkpoint import Checkpointer

    if not resume:
        if checkpointer.latest() is not None:
            raise UserError(f"{checkpointer.dir} already holds checkpoints: pass resume=auto to "
                            f"continue that run, or choose another out_dir")
        return None, None
    if resume not in ("auto", "force"):
        return resume, None
    candidates = checkpointer.list()
    if not candidates:
        say(f"resume={resume}: no checkpoint in {checkpointer.dir}, starting fresh")
        return None, None
    for path in reversed(candidates):
        try:
            return path, Checkpointer.load(path)
        except UserError as e:
            say(f"resume={resume}: skipping {path}: {e}")
    raise UserError(f"resume={resume}: none of the {len(candidates)} checkpoint(s) in {checkpointer.dir} "
                    f"can be read (the reasons are above): continue from a copy, or choose another out_dir")


def dry_run_resume(cfg, checked, say: Callable[[str], None]) -> None:
    """The resume decision and check of a run, without building it (`--dry-run`): which
    checkpoint it would start from and whether that resume is allowed (the student's shape is
    compared through the config keys that make it)."""
    from trainer.checkpoint import Checkpointer
    from trainer.config import task_class, to_dict

    ckpt_dir = cfg.checkpoint.dir or f"{cfg.out_dir.rstrip('/')}/checkpoints"
    checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, is_main=False)
    path, state = choose_checkpoint(checkpointer, cfg.resume, say)
    if path is None:
        say("resume: a fresh run" if not cfg.resume else "resume: nothing to resume, a fresh run")
        return
    if state is None:
        state = Checkpointer.load(path)
    if state.get("task", cfg.task) != cfg.task:
        raise UserError(f"cannot resume from {path}: it was written by task {state['task']!r}, "
                        f"this config runs {cfg.task!r}")
    fingerprint = data_fingerprint(checked.manifests, cfg.data.split) if checked.manifests else None
    notes = check_resume(path, state, to_dict(cfg), state.get("student_arch") or {}, fingerprint,
                         extra=task_class(cfg.task).resume_may_change, force=cfg.resume == "force")
    for note in notes:
        say(note)
    say(f"resume: from {path} at step {state.get('step')}")
