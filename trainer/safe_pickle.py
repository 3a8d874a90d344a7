"""Reading untrusted checkpoints without running code from them.

A PyTorch checkpoint is a pickle, and a pickle may name any importable callable (`os.system`,
`builtins.exec`, ...) to be called while it loads. Real fairseq checkpoints also pickle objects
of classes we neither have nor want to import (omegaconf's DictConfig, argparse.Namespace,
numpy scalars, fairseq meters), so `torch.load(weights_only=True)` refuses them.

`load_checkpoint` reads both kinds with an allow-list unpickler: the globals tensors are rebuilt
from (torch's rebuild functions, dtypes, storage types, `torch.Size`, `OrderedDict`) and a few
harmless builtins resolve to the real thing; every other global resolves to an inert stub class
that records its name and whatever the pickle hands it, and runs nothing. Nothing is imported
on behalf of the file. There is no fallback to the full unpickler.

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
import types
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
    for cls in (torch.storage.UntypedStorage, torch.storage.TypedStorage):
        allowed[(cls.__module__, cls.__name__)] = cls
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; anything else becomes an inert `Stub` subclass.
    torch.load subclasses this (its wrapper maps legacy `*Storage` names to dtypes first)."""

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


def _safe_load(file, **kwargs):
    return SafeUnpickler(file, **kwargs).load()


# what torch.load's `pickle_module` needs: an Unpickler to subclass, and `load` (torch reads the
# header pickles of its legacy format with `load`, so that one must be safe too)
_SAFE_PICKLE_MODULE = types.SimpleNamespace(
    __name__="trainer.safe_pickle", Unpickler=SafeUnpickler, load=_safe_load,
    UnpicklingError=pickle.UnpicklingError)


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip whose top folder holds constants.pkl: torch.load hands such a file to
    torch.jit.load, which would run the TorchScript code stored in it."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str | Path) -> Any:
    """torch.load `path` on CPU through the allow-list unpickler. Raises what torch.load raises
    for a file that is not a checkpoint (the caller turns it into a one-line error).

    Why `weights_only=False` is safe here, and needed: it is the only mode in which torch.load
    takes our `pickle_module`, and every unpickler torch then builds (the zip format's data.pkl,
    the legacy format's headers and body) is a subclass of SafeUnpickler, so each global the
    file names goes through the allow-list above. `weights_only=True` cannot stub the unknown
    classes a real fairseq file pickles. Its one other branch, a TorchScript archive sent to
    torch.jit.load (which runs the archive's code), is refused before torch.load is called."""
    if is_torchscript_archive(path):
        raise UnsafeCheckpointError("it is a TorchScript archive: loading it would run the code it holds")
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_SAFE_PICKLE_MODULE)


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
