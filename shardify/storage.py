"""Where a source's files live: a local directory or a Hugging Face hub dataset repo.

A source reads `loc.open("data/val_images.tar.gz")` the same way whether the file is on disk
or streamed from the hub at a pinned commit (through fsspec's HfFileSystem; local files are
opened directly, which spares every local job fsspec's import time). Hub access is
resolved once, up front, with short timeouts, so a missing token, a refused gate or an
unreachable hub is a one-line error within seconds instead of a hang or a traceback.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field

from shardify.format import ShardifyError

HUB_TIMEOUT_S = 10.0


class LocalFiles:
    """The one file-system call a Location makes, on local files: picklable, stateless."""

    def open(self, path: str, mode: str = "rb"):
        return open(path, mode)


@dataclass
class Location:
    """A tree of files: the local copy or the hub repo at one commit."""

    fs: object  # LocalFiles, or an fsspec file system for the hub (picklable)
    root: str  # path of the tree's root inside `fs`
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    repo_id: str | None = None
    revision: str | None = None  # resolved commit sha on the hub
    local_path: str | None = None
    hidden: list[str] = field(default_factory=list)  # local: hidden files and folders (not inputs)
    listing_digest: str | None = None  # local: names, sizes and mtimes of the files
    # local: (path, why) of entries that are neither regular files nor folders to enter (named
    # pipes, sockets, devices, links that loop): not inputs of any layout, never opened
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def open(self, rel: str, stream: bool = False):
        """Open a file for reading; `stream` for one front-to-back pass (one GET on the hub)."""
        if stream and self.local_path is None:
            return self.fs.open(f"{self.root}/{rel}", "rb", block_size=0)
        return self.fs.open(f"{self.root}/{rel}", "rb")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def describe(self) -> dict:
        return {"id": self.repo_id, "revision": self.revision, "local_path": self.local_path}


def local_location(path: str, repo_id: str | None = None) -> Location:
    """A local directory laid out like the hub repo (or a classic local layout).

    A folder that cannot be listed is an error, not a silent gap: its inputs would be missing
    from every count. Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints/`) are not
    inputs of any layout; they are listed in `hidden` (folders not entered) so that a layout
    can account for them. Symbolic links to folders are followed (how ImageNet copies are often
    assembled: `train/n01440764 -> /data/n01440764`), except one that leads back to a folder
    above it (a loop); entries that are not regular files (named pipes, sockets, devices: a
    read could block forever) are never opened. Both go to `skipped` with the reason.
    `listing_digest` fingerprints names, sizes and modification times.
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise ShardifyError(f"--source {path}: no such directory")
    files, hidden, skipped = [], [], []
    digest = hashlib.blake2b(digest_size=16)

    def fail(exc: OSError) -> None:
        where = exc.filename or root
        raise ShardifyError(f"cannot list {where} ({exc.strerror or exc}): its files would be missing "
                            "from the shards; fix its permissions or move it out of --source") from None

    parts: list[str] = []  # the digest's input, hashed in batches (same digest as file by file)

    def visit(dirpath: str, prefix: str, above: frozenset) -> None:
        """One folder, as os.walk visits it top-down: its files in name order, then its
        sub-folders in name order. `above`: (device, inode) of the folders on the way here."""
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            fail(exc)
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            name, rel = entry.name, prefix + entry.name
            if is_dir:
                if name.startswith("."):
                    hidden.append(rel + "/")
                elif _folder_id(entry, fail) in above:
                    skipped.append((rel + "/", "a link to a folder above it (a loop): not entered"))
                else:
                    subdirs.append(entry)
                continue
            if name.startswith("."):
                hidden.append(rel)
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                fail(exc)
            if not stat.S_ISREG(st.st_mode):
                skipped.append((rel, f"{_file_kind(st.st_mode)}, not a regular file: not opened"))
                continue
            files.append(rel)
            parts.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
            if len(parts) >= 65536:  # a million files' digest input would be held three times
                digest.update("".join(parts).encode())
                parts.clear()
        for entry in subdirs:
            visit(entry.path, f"{prefix}{entry.name}/", above | {_folder_id(entry, fail)})

    visit(root, "", frozenset({_folder_id(root, fail)}))
    # names that are not valid UTF-8 arrive as surrogate escapes: hash their exact bytes
    digest.update("".join(parts).encode("utf-8", "surrogateescape"))
    files.sort()
    loc = Location(LocalFiles(), root, files, repo_id=repo_id, local_path=root)
    loc.hidden = sorted(hidden)
    loc.skipped = sorted(skipped)
    loc.listing_digest = digest.hexdigest()
    return loc


def _folder_id(entry, fail) -> tuple[int, int]:
    """(device, inode) of a folder (an os.DirEntry or a path), through links."""
    try:
        st = entry.stat() if isinstance(entry, os.DirEntry) else os.stat(entry)
    except OSError as exc:
        fail(exc)
    return st.st_dev, st.st_ino


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


def local_file_location(path: str) -> Location:
    """A Location holding one local file (e.g. a URL list): its folder as the root, that file
    only, and a listing digest of that file alone (the folder is not walked)."""
    path = os.path.abspath(path)
    root, name = os.path.dirname(path), os.path.basename(path)
    st = os.stat(path)
    digest = hashlib.blake2b(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(), digest_size=16)
    loc = Location(LocalFiles(), root, [name], local_path=path)
    loc.listing_digest = digest.hexdigest()
    return loc


def hub_location(repo_id: str, revision: str | None, token: str | None = None) -> Location:
    """The hub dataset repo at `revision` (default main), resolved to a commit sha."""
    try:
        from huggingface_hub import HfApi, HfFileSystem, constants, errors
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise ShardifyError(f"huggingface_hub is not installed ({exc})") from None

    if constants.HF_HUB_OFFLINE:
        raise ShardifyError(
            f"cannot reach the hub for {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); "
            "unset it, or pass --source DIR with a local copy"
        )
    api = HfApi(token=token)
    page = f"{constants.ENDPOINT}/datasets/{repo_id}"
    try:
        info = api.dataset_info(repo_id, revision=revision or "main", timeout=HUB_TIMEOUT_S)
    except errors.GatedRepoError:
        raise ShardifyError(
            f"{repo_id} is gated and your account has no access yet: accept its terms at {page}, "
            "then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise ShardifyError(f"{repo_id} has no revision {revision or 'main'!r}; check --revision") from None
    except errors.RepositoryNotFoundError:
        has_token = bool(token or api.token or _stored_token())
        hint = ("your token cannot see it: check the name and your access" if has_token
                else "no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN")
        raise ShardifyError(f"{repo_id} was not found or needs authentication ({hint})") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise ShardifyError(f"the hub refused your token for {repo_id} (HTTP 401): "
                                "log in again with `hf auth login` or set a valid HF_TOKEN") from None
        raise ShardifyError(f"the hub answered HTTP {status} for {repo_id}: {_first_line(exc)}") from None
    except Exception as exc:  # network errors come from httpx/requests depending on the version
        raise ShardifyError(
            f"cannot reach the hub at {constants.ENDPOINT} ({type(exc).__name__}: {_first_line(exc)}); "
            "check your network or proxy, or pass --source DIR with a local copy"
        ) from None
    files = sorted(s.rfilename for s in (info.siblings or []))
    fs = HfFileSystem(token=token)
    return Location(fs, f"datasets/{repo_id}@{info.sha}", files, repo_id=repo_id, revision=info.sha)


def _stored_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
