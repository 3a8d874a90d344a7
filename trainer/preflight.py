"""Pre-flight: every file a run needs, checked before anything is built or written.

`preflight(cfg)` reads the manifests (local or remote: the fsspec package for the scheme must be
installed), checks that they hold the configured splits and the kind of samples the task reads
(the manifest's `dataset` and `fields` against the task's `data_kind`), that the local shards they
list exist, that the tokenizer exists, and that the task's input files (teacher checkpoints,
model directories) exist. `trainer train` runs it before out_dir is created, `--dry-run` runs
exactly it, `trainer eval probe` runs the kind check on its shards. A problem is one UserError
line naming the config key.

The task's input files are `Task.input_files(cfg)` (trainer/tasks/base.py); by default every
`checkpoint` field of the task's sections (a local file) and every `path` field that is clearly
a local path (absolute, or starting with `.` or `~`; anything else may be a hub id, checked when
it is loaded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from dataclasses import dataclass, field

from trainer.errors import UserError
from trainer.rundir import missing_package, scheme_of

# what a loader kind reads (trainer/data/stream.py): fields that must all be there, and fields
# of which at least one must be
KIND_FIELDS = {
    "image": (("jpg",), ()),
    "text": ((), ("npy", "txt")),
    "image_text": (("jpg", "txt"), ()),
}
KIND_WORDS = {"image": "image shards (a jpg field)", "text": "text shards (an npy or txt field)",
              "image_text": "image-text shards (jpg and txt fields)"}


@dataclass
class Manifest:
    """One manifest as configured and as read."""

    key: str  # the config key it came from, e.g. "data.manifests[0]"
    given: str  # the configured value
    path: str  # the manifest.json it resolves to
    doc: dict = field(repr=False)


@dataclass
class Checked:
    """What the pre-flight read (the resume check compares the manifests' shards)."""

    manifests: list[Manifest]


def read_manifest(given: str, key: str) -> Manifest:
    """Read and validate one manifest as the loader does; a UserError naming `key` if it is
    missing or invalid."""
    from trainer.data.order import read_manifest as read_validated

    hint = missing_package(given)
    if hint:
        raise UserError(f"config key '{key}': {hint}")
    try:
        doc, path = read_validated(given)
    except (OSError, ValueError) as e:  # not found, unreadable, not JSON, not the contract
        raise UserError(f"config key '{key}': {e}") from None
    return Manifest(key, given, path, doc)


def check_kind(doc: dict, where: str, kind: str, who: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse a manifest whose fields do not hold what `who` reads (`kind`, plus `extra` fields).
    A manifest that declares no fields (hand-written ones) is not checked: the loader reports
    samples without their members."""
    fields = set(doc.get("fields") or [])
    if not fields:
        return
    need_all, need_one = KIND_FIELDS[kind]
    need_all = (*need_all, *extra)
    missing = [f for f in need_all if f not in fields]
    if missing or (need_one and not fields & set(need_one)):
        what = KIND_WORDS[kind] if not extra else f"{KIND_WORDS[kind][:-1]}, and {', '.join(extra)})"
        raise UserError(f"{where} holds dataset {doc.get('dataset')!r} with fields "
                        f"{', '.join(sorted(fields)) or 'none'}: {who} needs {what}")


def check_local_kinds(cfg, task) -> None:
    """The kind check alone, for the manifests that are local files (cheap: one small JSON read
    each); load_config runs it, so a task's own checks never read shards of another kind.
    Missing or unreadable manifests are left to the pre-flight."""
    from trainer.data.order import manifest_file

    for i, given in enumerate(cfg.data.manifests):
        path = manifest_file(given)
        if scheme_of(given) or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("fields"), list):
            check_kind(doc, f"config key 'data.manifests[{i}]': {path}", task.data_kind, f"task {cfg.task!r}")


def _check_split(m: Manifest, split: str, what: str) -> None:
    splits = m.doc["splits"]
    if split not in splits:
        raise UserError(f"config key '{what}': split {split!r} not in manifest {m.path} "
                        f"(has: {', '.join(sorted(splits)) or 'none'})")
    base = posixpath.dirname(m.path) if scheme_of(m.path) else os.path.dirname(os.path.abspath(m.path))
    if scheme_of(m.path):
        return  # remote shards are opened by the loader; listing them all here costs a request each
    for shard in splits[split].get("shards", []):
        p = os.path.join(base, shard["name"])
        if not os.path.exists(p):
            raise UserError(f"config key '{m.key}': shard not found: {p} (listed in {m.path})")


def default_input_files(task_cfg) -> list[tuple[str, str]]:
    """(dotted key, path) of every `checkpoint` field and every local-looking `path` field of a
    task's sections."""
    out: list[tuple[str, str]] = []
    if task_cfg is None or not dataclasses.is_dataclass(task_cfg):
        return out
    for f in dataclasses.fields(task_cfg):
        section = getattr(task_cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            if not isinstance(value, str) or not value:
                continue
            if g.name == "checkpoint" or (g.name == "path" and looks_local(value)):
                out.append((f"{f.name}.{g.name}", value))
    return out


def looks_local(value: str) -> bool:
    """A path that cannot be a hub id: absolute, ./ ../ ~, or existing."""
    return value.startswith(("/", ".", "~")) or os.path.exists(value)


def check_input_file(key: str, value: str) -> None:
    if scheme_of(value):
        hint = missing_package(value)
        if hint:
            raise UserError(f"config key '{key}': {hint}")
        return
    if not os.path.exists(os.path.expanduser(value)):
        raise UserError(f"config key '{key}': file not found: {value}")


def preflight(cfg, data: bool = True) -> Checked:
    """Check every input of the run described by `cfg` (see the module doc); `data=False` leaves
    out the manifests (a run fed by a hand-made loader)."""
    from trainer.tasks import get_task  # cfg.task was checked when the config was built

    task = get_task(cfg.task)
    for key, value in task.input_files(cfg):
        check_input_file(key, value)
    if not data:
        return Checked([])
    return Checked(_check_data(cfg, task))


def _check_data(cfg, task) -> list[Manifest]:
    data = cfg.data
    if not data.manifests:
        raise UserError("config key 'data.manifests' is empty: give at least one manifest.json path")
    manifests = []
    for i, given in enumerate(data.manifests):
        m = read_manifest(given, f"data.manifests[{i}]")
        check_kind(m.doc, f"config key '{m.key}': {m.path}", task.data_kind, f"task {cfg.task!r}")
        _check_split(m, data.split, "data.split")
        if data.val_split:
            _check_split(m, data.val_split, "data.val_split")
        manifests.append(m)
    if data.tokenizer and not scheme_of(data.tokenizer) and not os.path.exists(data.tokenizer):
        raise UserError(f"config key 'data.tokenizer': not found: {data.tokenizer}")
    return manifests
