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
from dataclasses import dataclass, field

from shardify.records import UserError

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
    can account for them. `listing_digest` fingerprints names, sizes and modification times.
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise UserError(f"--source {path}: no such directory")
    files, hidden = [], []
    digest = hashlib.blake2b(digest_size=16)

    def fail(exc: OSError) -> None:
        where = exc.filename or root
        raise UserError(f"cannot list {where} ({exc.strerror or exc}): its files would be missing "
                        "from the shards; fix its permissions or move it out of --source") from None

    parts: list[str] = []  # the digest's input, hashed in batches (same digest as file by file)

    def visit(dirpath: str, prefix: str) -> None:
        """One folder, as os.walk visits it top-down: its files in name order, then its
        sub-folders in name order (symbolic links to folders are not entered)."""
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
                elif not entry.is_symlink():
                    subdirs.append(entry)
                continue
            if name.startswith("."):
                hidden.append(rel)
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                fail(exc)
            files.append(rel)
            parts.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
            if len(parts) >= 65536:  # a million files' digest input would be held three times
                digest.update("".join(parts).encode())
                parts.clear()
        for entry in subdirs:
            visit(entry.path, f"{prefix}{entry.name}/")

    visit(root, "")
    digest.update("".join(parts).encode())
    files.sort()
    loc = Location(LocalFiles(), root, files, repo_id=repo_id, local_path=root)
    loc.hidden = sorted(hidden)
    loc.listing_digest = digest.hexdigest()
    return loc


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
        raise UserError(f"huggingface_hub is not installed ({exc})") from None

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"cannot reach the hub for {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); "
            "unset it, or pass --source DIR with a local copy"
        )
    api = HfApi(token=token)
    page = f"{constants.ENDPOINT}/datasets/{repo_id}"
    try:
        info = api.dataset_info(repo_id, revision=revision or "main", timeout=HUB_TIMEOUT_S)
    except errors.GatedRepoError:
        raise UserError(
            f"{repo_id} is gated and your account has no access yet: accept its terms at {page}, "
            "then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision or 'main'!r}; check --revision") from None
    except errors.RepositoryNotFoundError:
        has_token = bool(token or api.token or _stored_token())
        hint = ("your token cannot see it: check the name and your access" if has_token
                else "no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN")
        raise UserError(f"{repo_id} was not found or needs authentication ({hint})") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise UserError(f"the hub refused your token for {repo_id} (HTTP 401): "
                            "log in again with `hf auth login` or set a valid HF_TOKEN") from None
        raise UserError(f"the hub answered HTTP {status} for {repo_id}: {_first_line(exc)}") from None
    except Exception as exc:  # network errors come from httpx/requests depending on the version
        raise UserError(
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
