"""The allow-list unpickler: checkpoints whose pickle would run a command if executed are read
without running it; tensors, parameters and plain containers still load; omegaconf cfgs are
read (as plain dicts) without importing omegaconf."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import subprocess
import sys

import pytest
import torch

from tests.d2v2_fixtures import Payload, make_teacher_omegaconf, save_with_omegaconf_cfg
from tests.train_fixtures import make_teacher
from trainer.errors import UserError
from trainer.models.vit import ViTShape, checkpoint_cfg, load_data2vec2, read_checkpoint
from trainer.safe_pickle import Stub, UnsafeCheckpointError, load_checkpoint, loads, to_plain


def _touch(marker) -> Payload:
    return Payload(os.system, f"touch '{marker}'")


def _exec(marker) -> Payload:
    return Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")


def _popen(marker) -> Payload:
    return Payload(subprocess.Popen, ["touch", str(marker)])


PAYLOADS = {"os.system": _touch, "builtins.exec": _exec, "subprocess.Popen": _popen}


def _live(path, marker, loader):
    """The fixture is really malicious: a full unpickler runs the payload (here harmless)."""
    assert not marker.exists()
    result = loader(path)
    for obj in (result, *(result.values() if isinstance(result, dict) else ())):
        if isinstance(obj, subprocess.Popen):  # the payload started a process: let it finish
            obj.wait()
    assert marker.exists(), "the fixture should run its payload under a full unpickler"
    marker.unlink()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_cfg_is_not_executed_and_the_model_still_loads(tmp_path, kind):
    """The payload sits where a real checkpoint has its cfg object: it becomes an inert stub."""
    marker = tmp_path / "pwned"
    path = make_teacher(tmp_path / "t.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"] = PAYLOADS[kind](marker)
    torch.save(ckpt, path)
    _live(path, marker, lambda p: torch.load(p, weights_only=False))

    loaded = read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(loaded["cfg"], Stub) and loaded["cfg"].stub_of in (
        {"os.system": ("posix.system", "os.system"), "builtins.exec": ("builtins.exec",),
         "subprocess.Popen": ("subprocess.Popen",)}[kind])
    model = load_data2vec2(path, num_heads=2)  # the cfg is gone: heads from the config
    assert model.shape.depth == 3 and not marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_tensor_slot_fails_with_one_line_naming_the_global(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = make_teacher(tmp_path / "t.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["blocks.0.attn.qkv.weight"] = PAYLOADS[kind](marker)
    torch.save(ckpt, path)
    with pytest.raises(UserError) as e:
        load_data2vec2(path)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.0.attn.qkv.weight" in msg
    assert kind.split(".")[1] in msg and "not a tensor" in msg
    assert not marker.exists()


def test_whole_file_is_a_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "t.pt"
    torch.save(_popen(marker), path)
    with pytest.raises(UserError, match=r"holds an object of class subprocess\.Popen") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_torchscript_archive_is_refused_before_torch_jit_load(tmp_path, monkeypatch):
    """torch.load(weights_only=False) hands a TorchScript zip to torch.jit.load, which runs the
    archive's code: the safe loader must refuse it without ever getting there."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    called = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: called.append(a))
    with pytest.raises(UserError, match="refused: it is a TorchScript archive") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and not called
    # an ordinary zip-format checkpoint is no TorchScript archive
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "plain.pt")
    assert torch.equal(read_checkpoint(tmp_path / "plain.pt")["model"]["w"], torch.ones(1))


@pytest.mark.parametrize("fmt", ["legacy", "plain-pickle"])
def test_other_file_formats_are_read_safely_too(tmp_path, fmt):
    """torch.load reads the header of its legacy format with the pickle module's `load`, and a
    plain pickle file goes down that path: both must use the allow-list."""
    marker = tmp_path / "pwned"
    path = tmp_path / "t.pt"
    if fmt == "legacy":
        torch.save({"model": {"w": torch.ones(2)}, "cfg": _exec(marker)}, path, _use_new_zipfile_serialization=False)
        _live(path, marker, lambda p: torch.load(p, weights_only=False))
        ckpt = read_checkpoint(path)
        assert torch.equal(ckpt["model"]["w"], torch.ones(2)) and isinstance(ckpt["cfg"], Stub)
    else:
        path.write_bytes(pickle.dumps(_exec(marker), protocol=2))
        _live(path, marker, lambda p: pickle.loads(p.read_bytes()))
        with pytest.raises(UserError, match="could not be read"):
            read_checkpoint(path)
    assert not marker.exists()


def test_hand_written_gadget_chains_fail_without_running(tmp_path):
    marker = tmp_path / "pwned"
    # getattr(importlib.import_module("os"), "system")("touch marker"), protocol 0
    chain = (b"cbuiltins\ngetattr\n(cimportlib\nimport_module\n(S'os'\ntRS'system'\ntR(S'touch "
             + str(marker).encode() + b"'\ntR.")
    _live(chain, marker, pickle.loads)
    with pytest.raises(TypeError):  # the stub getattr returned a stub, which cannot be called
        loads(chain)
    # INST opcode: os.system("touch marker") spelled as a class instantiation
    inst = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    _live(inst, marker, pickle.loads)
    assert isinstance(loads(inst), Stub)
    # bytes via _codecs.encode are fine in latin1, any other codec is refused
    assert loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"
    with pytest.raises(UnsafeCheckpointError, match="rot13"):
        loads(b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.")
    assert not marker.exists()


@pytest.mark.parametrize("new_format", [True, False])
def test_a_truncated_checkpoint_is_one_line(tmp_path, new_format):
    path = tmp_path / "t.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, path, _use_new_zipfile_serialization=new_format)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="could not be read") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_objects_of_other_classes_become_inert_records(protocol):
    """Older fairseq files store an argparse Namespace (`args`): every protocol (0 and 1 go
    through copyreg._reconstructor) gives a stub that to_plain turns into a dict."""
    import argparse

    got = loads(pickle.dumps({"args": argparse.Namespace(arch="data2vec", depth=12)}, protocol=protocol))
    assert isinstance(got["args"], Stub) and got["args"].stub_of == "argparse.Namespace"
    assert to_plain(got) == {"args": {"arch": "data2vec", "depth": 12}}


def test_stubs_cannot_be_pickled_back():
    stub = loads(pickle.dumps(Payload(os.system, "true"), protocol=2))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(stub)


def test_tensors_and_containers_round_trip(tmp_path, monkeypatch):
    """Both torch.save formats are read by our own reader: torch.load is never called."""
    sd = collections.OrderedDict(
        f32=torch.randn(3, 4), param=torch.nn.Parameter(torch.randn(2)), i64=torch.arange(5),
        bf16=torch.randn(4).bfloat16(), view=torch.arange(10.0)[2:7:2], flag=torch.tensor(True))
    obj = {"model": sd, "n": 3, "s": "x", "b": b"\x00\x01", "set": {1, 2}, "t": (1.5, None), "l": [1, [2]],
           "dev": torch.device("cpu"), "dtype": torch.float16}
    for new_format in (True, False):
        path = tmp_path / f"c{new_format}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=new_format)
        with monkeypatch.context() as m:
            m.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
            got = load_checkpoint(path)
        assert type(got["model"]) is collections.OrderedDict and list(got["model"]) == list(sd)
        for k, v in sd.items():
            assert type(got["model"][k]) is type(v) and got["model"][k].dtype == v.dtype
            assert torch.equal(got["model"][k], v)
        assert {k: got[k] for k in obj if k != "model"} == {k: obj[k] for k in obj if k != "model"}


def _no_omegaconf(monkeypatch):
    """Hide an installed omegaconf and record any attempt to import it."""
    attempts = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "omegaconf":
                attempts.append(name)
                raise ImportError(f"blocked import of {name}")
            return None

    for name in [n for n in sys.modules if n.split(".")[0] == "omegaconf"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Blocker(), *sys.meta_path])
    return attempts


CFG = {"model": {"_name": "data2vec_multi", "depth": 3, "num_heads": 4, "norm_eps": 1e-6,
                 "num_alibi_heads": "${model.num_heads}", "betas": [0.9, 0.98], "none": None, "missing": "???",
                 "modalities": {"image": {"prenet_depth": 0, "patch_size": 8}}},
       "task": {"_name": "mae_image_pretraining"}}


def test_hand_built_omegaconf_cfg_loads_without_omegaconf(tmp_path, monkeypatch):
    attempts = _no_omegaconf(monkeypatch)
    path = save_with_omegaconf_cfg(tmp_path / "c.pt", {"model": {"w": torch.zeros(1)}}, CFG)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch's own safe loader refuses the cfg objects
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt["cfg"], Stub) and ckpt["cfg"].stub_of == "omegaconf.dictconfig.DictConfig"
    assert checkpoint_cfg(ckpt) == CFG
    assert attempts == [] and "omegaconf" not in sys.modules


def test_real_omegaconf_pickles_read_as_omegaconf_itself_reads_them(tmp_path, monkeypatch):
    """Against the library itself (optional: skipped with a reason when it is not installed)."""
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf not installed: real-pickle check skipped")
    conf = omegaconf.OmegaConf.create(CFG)
    want = omegaconf.OmegaConf.to_container(conf, resolve=False)
    path = tmp_path / "c.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": conf}, path)
    attempts = _no_omegaconf(monkeypatch)
    got = to_plain(read_checkpoint(path)["cfg"])
    assert got == want and attempts == []


def test_teacher_with_omegaconf_cfg_takes_heads_from_it(tmp_path, monkeypatch):
    _no_omegaconf(monkeypatch)
    # 32 wide: heads cannot be read off the tensors; the cfg says 8
    path = make_teacher_omegaconf(tmp_path / "t.pt", ViTShape(16, 8, 32, 2, 8))
    assert load_data2vec2(path).shape.num_heads == 8
