"""Where a run writes: a local directory or a prefix on object storage (s3://, gs://).

`open_store(url, key)` gives a `Store` with the few operations the run directory needs: list the
names in it, write a file atomically, read one, delete one. Local stores write to a temporary
name, fsync and rename. On object storage a single PUT (multipart uploads included) makes the
finished object visible at once, or not at all; the bytes are first written to a local
temporary file, so a process killed half way leaves a local temporary behind, never a
half-written object under the final name.

Remote URLs go through fsspec; s3:// needs s3fs (`pip install 'shardify-kd[s3]'`), gs:// needs
gcsfs (`[gcs]`). A missing package, or a scheme the run directory does not support, is one line
naming the config key. Credentials and endpoints come from the usual environment of those
libraries (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...).

One writer per remote run directory: object storage has no lock a process could hold for the
run's life, so the run lock (a local flock) does not extend to it; the user (or the scheduler:
one job per out_dir) keeps to one run per prefix. `RunFiles` keeps the logs of a remote run in a
local staging directory and uploads them at every checkpoint and at the end.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from trainer.errors import UserError

# scheme -> (the fsspec implementation's module, the extra that installs it)
REMOTE_SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def scheme_of(url: str) -> str:
    """"s3" for s3://bucket/x, "" for a local path (file:// included)."""
    if "://" not in url:
        return ""
    scheme = url.split("://", 1)[0].lower()
    return "" if scheme == "file" else scheme


def missing_package(url: str) -> str:
    """A one-line hint when the fsspec implementation for `url`'s scheme is not installed,
    else ""."""
    scheme = scheme_of(url)
    if scheme not in REMOTE_SCHEMES:
        return ""
    module, extra = REMOTE_SCHEMES[scheme]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
        found = False
    if found:
        return ""
    return f"{scheme}:// needs the {module} package: pip install 'shardify-kd[{extra}]'"


class Store:
    """A directory of files named by plain names (no sub-directories)."""

    url: str
    remote: bool

    def path(self, name: str):
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return name in self.names()

    def write(self, name: str, fill: Callable) -> object:
        """`fill(binary file)` writes the content; it becomes visible under `name` only whole."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError


class LocalStore(Store):
    remote = False

    def __init__(self, directory: str | Path):
        self.dir = Path(str(directory).removeprefix("file://"))
        self.url = str(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []

    def exists(self, name: str) -> bool:
        return (self.dir / name).is_file()

    def write(self, name: str, fill: Callable) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / name
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # make the rename itself durable before anything older is deleted
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)


class RemoteStore(Store):
    """A prefix on object storage, through fsspec."""

    remote = True

    def __init__(self, url: str, fs):
        self.url = url.rstrip("/")
        self.fs = fs

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.url, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.url)
        return bool(self.fs.isfile(self.path(name)))

    def write(self, name: str, fill: Callable) -> str:
        # the whole object is written locally first: one upload publishes it under its final
        # name only once complete (object stores have no rename, and need none)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{os.getpid()}")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            self.fs.put_file(tmp, self.path(name))
        finally:
            os.unlink(tmp)
        self.fs.invalidate_cache(self.url)
        return self.path(name)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.url)


def open_store(url: str | Path, key: str) -> Store:
    """The store for a config value; `key` (e.g. "out_dir") names it in the one-line errors."""
    url = str(url)
    scheme = scheme_of(url)
    if not scheme:
        return LocalStore(url)
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"config key '{key}': {scheme}:// is not supported for a run directory "
                        f"(a local path, s3:// or gs://)")
    hint = missing_package(url)
    if hint:
        raise UserError(f"config key '{key}': {hint}")
    import fsspec

    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise UserError(f"config key '{key}': cannot use {url}: {e}") from None
    if not url.split("://", 1)[1].split("/", 1)[0]:
        raise UserError(f"config key '{key}': {url} names no bucket")
    return RemoteStore(url, fs)


def check_bucket(store: RemoteStore, key: str) -> None:
    """One line now if the bucket of a remote store cannot be reached (missing, no credentials,
    no endpoint), rather than a traceback at the first checkpoint."""
    bucket = store.url.split("://", 1)[1].split("/", 1)[0]
    try:
        found = store.fs.exists(bucket)
        if found:
            store.names()
    except (OSError, ValueError) as e:
        raise UserError(f"config key '{key}': cannot list {store.url}: {_first_line(e)}") from None
    if not found:
        raise UserError(f"config key '{key}': bucket {bucket} not found (or not reachable with these credentials)")


class RunFiles:
    """The run directory's files besides the checkpoints: config.yaml, log.jsonl, tb/.

    Local: `local` is out_dir itself. Remote: `local` is a staging directory the logger writes
    to; `fetch_logs()` brings an earlier log.jsonl down before a resume, `sync()` uploads the
    logs (at every checkpoint and at the end)."""

    LOGS = ("log.jsonl",)

    def __init__(self, out_dir: str):
        self.store = open_store(out_dir, "out_dir")
        self.remote = self.store.remote
        self._staging: str | None = None
        if self.remote:
            self._staging = tempfile.mkdtemp(prefix="trainer-run-")
            self.local = Path(self._staging)
        else:
            self.local = self.store.dir

    def check(self) -> None:
        """Fail now if out_dir cannot be a directory (an existing file on its path), or if the
        bucket cannot be reached."""
        if self.remote:
            check_bucket(self.store, "out_dir")
            return
        for parent in (self.local, *self.local.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"cannot create out_dir {self.local}: {parent} is not a directory")
                break

    def prepare(self) -> None:
        """Create out_dir (local), or fetch the logs an earlier run left there (remote)."""
        if not self.remote:
            try:
                self.local.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create out_dir {self.local}: {e.strerror or e}") from None
            return
        for name in self.LOGS:
            if self.store.exists(name):
                (self.local / name).write_bytes(self.store.read(name))

    def write_text(self, name: str, text: str) -> None:
        data = text.encode()
        if self.remote:
            self.store.write(name, lambda f: f.write(data))
        else:
            (self.local / name).write_text(text)

    def sync(self) -> None:
        """Upload the logs of a remote run (a no-op for a local one)."""
        if not self.remote:
            return
        for path in sorted(self.local.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.local).as_posix()
                self.store.fs.put_file(str(path), self.store.path(rel))

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
