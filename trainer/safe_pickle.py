"""Reading untrusted checkpoints without running code from them.

A PyTorch checkpoint is a pickle, and a pickle may name any importable callable (`os.system`,
`builtins.exec`, ...) to be called while it loads. Real fairseq checkpoints also pickle objects
of classes we neither have nor want to import (omegaconf's DictConfig, argparse.Namespace,
numpy scalars, fairseq meters), so `torch.load(weights_only=True)` refuses them.

`load_checkpoint` reads both kinds, in either file format of `torch.save` (zip, and the legacy
pre-1.6 stream), with its own reader and an allow-list unpickler, never through torch.load: the
globals tensors are rebuilt from (torch's rebuild functions, dtypes, `torch.Size`,
`OrderedDict`) and a few harmless builtins resolve to the real thing; storage types resolve to
a plain dtype tag; every other global resolves to an inert stub class that records its name and
whatever the pickle hands it, and runs nothing. Nothing is imported on behalf of the file.
There is no fallback to the full unpickler.

Why not `torch.load(weights_only=True)` with `get_unsafe_globals_in_checkpoint` and inert
stand-ins under `safe_globals` (prototyped against tests/test_safe_pickle.py with torch 2.14;
real omegaconf cfgs do read that way): the scan reads zip files only, so a legacy-format file
with a cfg object is refused; a payload naming `os.system` or `subprocess.Popen` makes the whole
load fail (the model is lost, not just the cfg) with torch's multi-line message instead of one
line naming the global; plain pickles (`loads`: argparse Namespaces at every protocol, gadget
chains) have no supported entry point (only the private `torch._weights_only_unpickler`).

`to_plain` turns what a checkpoint's cfg became (stubs of omegaconf containers and value nodes,
argparse namespaces) into plain dicts, lists and values, so callers read `cfg["model"]["depth"]`
without omegaconf installed.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asked for something we refuse even as a stub."""


class Stub:
    """Inert stand-in for an object of a class that is not on the allow-list.

    `stub_of` is the global the pickle named ("module.name"); `args`/`kwargs` what it was
    constructed or called with; `state` what it was given by BUILD (`__setstate__`); `items`
    and `list_items` what SETITEMS / APPENDS added (dict and list subclasses)."""

    stub_of = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
        return obj

    def __init__(self, *args, **kwargs):  # the pickle's REDUCE ends here: record, run nothing
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    # dict and list subclasses are rebuilt through item assignment and append/extend
    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, value):
        self.__dict__["list_items"].append(value)

    def extend(self, values):
        self.__dict__["list_items"].extend(values)

    def __reduce__(self):
        # re-pickling a stub would write the original global back out: refuse
        raise TypeError(f"an inert stub of {self.stub_of} cannot be pickled")

    def __repr__(self):
        return f"<stub of {self.stub_of}>"


_stub_classes: dict[str, type[Stub]] = {}


def stub_class(module: str, name: str) -> type[Stub]:
    """One Stub subclass per named global (cached), so `isinstance` and `stub_of` identify it."""
    key = f"{module}.{name}"
    cls = _stub_classes.get(key)
    if cls is None:
        # the class lives in this module under a safe name: it can never be mistaken for, or
        # pickled back as, the global it stands for
        cls = type("Stub_" + re.sub(r"\W", "_", key), (Stub,), {"stub_of": key})
        _stub_classes[key] = cls
    return cls


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    """Protocol 2 writes bytes as `_codecs.encode(str, "latin1")`; no other codec is allowed
    (a codec name makes `codecs` import a module of that name)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise UnsafeCheckpointError(f"checkpoint pickle asks for _codecs.encode with {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor (protocols 0 and 1) only ever builds stubs here."""
    if isinstance(cls, type) and issubclass(cls, Stub):
        obj = cls()
        if state is not None:
            obj.__setstate__(state)
        return obj
    raise UnsafeCheckpointError(f"checkpoint pickle asks to reconstruct {cls!r} from {base!r}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a tensor checkpoint legitimately names, mapped to the real objects."""
    u = torch._utils
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        # plain data types: calling them builds data, nothing else (omegaconf's metadata names them)
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("builtins", "int"): int,
        ("builtins", "float"): float,
        ("builtins", "str"): str,
        ("builtins", "bool"): bool,
        ("builtins", "bytes"): bytes,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
    }
    # the rebuild functions torch.save writes for dense tensors and parameters (the same ones
    # torch's own weights-only unpickler allows; sparse, quantised and subclass rebuilds are
    # left out: a model checkpoint has none)
    for fn in (u._rebuild_tensor, u._rebuild_tensor_v2, u._rebuild_tensor_v3, u._rebuild_parameter,
               u._rebuild_parameter_with_state, u._rebuild_meta_tensor_no_storage):
        allowed[("torch._utils", fn.__name__)] = fn
    for obj in vars(torch).values():
        if isinstance(obj, torch.dtype):  # dtypes pickle as torch.float32 etc.
            allowed[("torch", str(obj).split(".", 1)[1])] = obj
    for layout in (torch.strided, torch.sparse_coo):
        allowed[("torch", str(layout).split(".", 1)[1])] = layout
    # storage types only ever tag a persistent id (below): a dtype, nothing that can be called
    for name, dtype in _LEGACY_STORAGE_DTYPES.items():
        allowed[("torch", f"{name}Storage")] = _StorageKind(dtype)
    for module in ("torch", "torch.storage"):
        allowed[(module, "UntypedStorage")] = _StorageKind(torch.uint8)
    return allowed


class _StorageKind:
    """What a pickle's `torch.FloatStorage` (etc.) resolves to here: the dtype of the storage
    records it tags. It cannot be called, so a pickle cannot use it to allocate anything."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __repr__(self):
        return f"<storage of {self.dtype}>"


# the storage classes torch.save names (torch.<Name>Storage), for the dtypes a model holds
_LEGACY_STORAGE_DTYPES = {
    "Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool, "ComplexFloat": torch.complex64, "ComplexDouble": torch.complex128}


_ALLOWED: dict[tuple[str, str], Any] | None = None


class SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; anything else becomes an inert `Stub` subclass."""

    def find_class(self, module, name):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(f"checkpoint pickle names a non-string global {module!r}.{name!r}")
        # protocol 2 (torch.save's default) writes Python 2 names (__builtin__, copy_reg): the
        # default find_class maps them back, ours must too
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _ALLOWED.get((module, name))
        return obj if obj is not None else stub_class(module, name)


def _safe_load(file) -> Any:
    return SafeUnpickler(file).load()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _typed(data: torch.Tensor, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """The bytes in `data` (uint8) as the typed storage torch's rebuild functions take."""
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)


def _storage_id(pid, length: int) -> tuple:
    """A persistent id `("storage", kind, key, location, numel[, view])`, checked."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ("storage", b"storage")):
        raise UnsafeCheckpointError(f"checkpoint pickle holds an unexpected persistent id {str(pid)[:80]}")
    kind, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(kind, _StorageKind) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise UnsafeCheckpointError(f"checkpoint pickle holds a malformed storage id {str(pid)[:80]}")
    return pid


class _ZipUnpickler(SafeUnpickler):
    """data.pkl of torch's zip format: storages come from the archive's `data/<key>` records."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def persistent_load(self, pid):
        _, kind, key, _location, numel = _storage_id(pid, 5)  # every storage is loaded on the CPU
        if key not in self.storages:
            nbytes = numel * _element_size(kind.dtype)
            name = f"{self.prefix}data/{key}"
            size = self.archive.getinfo(name).file_size  # KeyError: the record is missing
            if size != nbytes:
                raise pickle.UnpicklingError(f"record {name} holds {size} bytes, its tensor needs {nbytes}")
            data = torch.empty(nbytes, dtype=torch.uint8)
            with self.archive.open(name) as f:
                f.readinto(data.numpy())
            self.storages[key] = _typed(data, kind.dtype)
        return self.storages[key]


class _LegacyUnpickler(SafeUnpickler):
    """The object pickle of torch's pre-1.6 format: storages are created empty here and filled
    from the raw records that follow the pickle."""

    def __init__(self, file):
        super().__init__(file)
        self.roots: dict[str, tuple[torch.Tensor, Any, int]] = {}  # key -> (bytes, storage, numel)

    def persistent_load(self, pid):
        _, kind, key, _location, numel, view = _storage_id(pid, 6)
        if view is not None:
            raise pickle.UnpicklingError("storage views (written by torch before 1.0) are not supported")
        if key not in self.roots:
            data = torch.empty(numel * _element_size(kind.dtype), dtype=torch.uint8)
            self.roots[key] = (data, _typed(data, kind.dtype), numel)
        return self.roots[key][1]


_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("a zip file without exactly one <folder>/data.pkl: "
                                         "not a torch.save checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
            raise pickle.UnpicklingError("a big-endian checkpoint: not supported")
        with archive.open(pkl[0]) as f:
            return _ZipUnpickler(f, archive, prefix).load()


def _load_legacy(path: Path) -> Any:
    """torch.save(..., _use_new_zipfile_serialization=False): magic number, protocol, system
    info, the object pickle, its storage keys, then each storage as an int64 count and raw bytes."""
    with open(path, "rb") as f:
        if _safe_load(f) != _LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch.save checkpoint (no magic number)")
        if _safe_load(f) != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("an unknown torch.save protocol version")
        info = _safe_load(f)
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise pickle.UnpicklingError("a big-endian checkpoint: not supported")
        unpickler = _LegacyUnpickler(f)
        result = unpickler.load()
        keys = _safe_load(f)
        if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.roots):
            raise pickle.UnpicklingError("its storage list does not match the storages its pickle uses")
        for key in keys:
            data, _, numel = unpickler.roots[key]
            count = int.from_bytes(f.read(8), "little")
            if count != numel or f.readinto(data.numpy()) != data.numel():
                raise pickle.UnpicklingError(f"storage {key} is truncated or the wrong size")
    return result


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip whose top folder holds constants.pkl: a TorchScript program (torch.jit.save), not
    a checkpoint; torch.load would hand it to torch.jit.load, which runs the code it stores."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str | Path) -> Any:
    """Read a `torch.save` file on CPU, either format, through the allow-list unpickler; nothing
    in it is executed and nothing is imported for it. torch.load is not used: its one mode that
    accepts a custom unpickler (`weights_only=False`) also has branches that run code from the
    file (a TorchScript archive goes to torch.jit.load). Raises for a file that is not such a
    checkpoint (the caller turns it into a one-line error)."""
    path = Path(path)
    if is_torchscript_archive(path):
        raise UnsafeCheckpointError("it is a TorchScript archive: loading it would run the code it holds")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return _load_zip(path) if is_zip else _load_legacy(path)


def loads(data: bytes) -> Any:
    """A plain pickle through the allow-list unpickler."""
    return SafeUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------
# cfg objects -> plain containers

# omegaconf value nodes keep their value under "_val"; containers under "_content"
_MISSING = "???"


def _stub_payload(obj: Stub) -> Any:
    """The data a stub carries: its BUILD state, else its items/args."""
    d = obj.__dict__
    if d["state"] is not None:
        state = d["state"]
        # a (dict_state, slots_state) pair, as objects with __slots__ pickle
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {})
            merged.update(state[1])
            return merged
        return state
    if d["items"]:
        return d["items"]
    if d["list_items"]:
        return d["list_items"]
    if len(d["args"]) == 1:
        return d["args"][0]
    return None


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Dicts, lists and values from a loaded cfg: omegaconf DictConfig/ListConfig stubs become
    dicts/lists of their content, value nodes their value, argparse Namespaces dicts. Other
    stubs stay stubs (inert). Recursion is bounded: a cfg is never deeper than a few levels."""
    if _depth > 100:
        raise UnsafeCheckpointError("checkpoint cfg is nested more than 100 levels deep")
    if isinstance(obj, Stub):
        payload = _stub_payload(obj)
        if isinstance(payload, dict):
            if "_content" in payload:  # omegaconf container
                return to_plain(payload["_content"], _depth + 1)
            if "_val" in payload:  # omegaconf value node
                return to_plain(payload["_val"], _depth + 1)
            if obj.stub_of in ("argparse.Namespace",) or obj.stub_of.endswith("Config"):
                return {k: to_plain(v, _depth + 1) for k, v in payload.items()}
        if isinstance(payload, list) and obj.stub_of.endswith("ListConfig"):
            return [to_plain(v, _depth + 1) for v in payload]
        return obj
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else repr(k)): to_plain(v, _depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v, _depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, _depth + 1) for v in obj)
    return obj


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def cfg_get(cfg: Any, *keys: str) -> Any:
    """cfg[keys[0]][keys[1]]... on a `to_plain` cfg (or None when absent or missing). A value
    that is a plain omegaconf interpolation "${a.b}" is looked up from the root once."""
    node = cfg
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return None
    if isinstance(node, str):
        if node == _MISSING:
            return None
        m = _INTERPOLATION.match(node)
        if m:
            target = cfg_get(cfg, *m.group(1).split("."))
            return None if isinstance(target, str) and _INTERPOLATION.match(target) else target
    return node


def stubs_in(obj: Any, _depth: int = 0) -> list[str]:
    """The globals of the stubs found in `obj` (dicts, lists, tuples walked)."""
    if _depth > 100:
        return []
    if isinstance(obj, Stub):
        return [obj.stub_of]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in stubs_in(v, _depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in stubs_in(v, _depth + 1)]
    return []


__all__ = ["Stub", "SafeUnpickler", "UnsafeCheckpointError", "cfg_get", "load_checkpoint", "loads",
           "stub_class", "stubs_in", "to_plain"]
