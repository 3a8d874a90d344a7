"""Run directories on object storage (trainer/rundir.py; issue 18, item 4), against a real
S3-compatible server started here (moto's server mode on 127.0.0.1), through s3fs.

out_dir=s3://bucket/run holds config.yaml, log.jsonl and the checkpoints as objects; a resume
reads them back (bit-exact against a local run); a checkpoint whose write fails never appears
under its name; unsupported schemes, a missing package and a missing bucket are one line."""

from __future__ import annotations

import io
import os
import sys
import tempfile

import pytest
import torch

from tests.test_train_resume import toy_args, train
from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import Trainer

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is part of the test extra")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of the test extra")

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """An empty bucket on the server; the environment a user sets for another S3 endpoint."""
    import s3fs

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing", secret="testing")
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.removeprefix(f"{BUCKET}/{prefix}/") for p in fs.find(f"{BUCKET}/{prefix}"))


def remote_params(fs, key: str) -> dict:
    return torch.load(io.BytesIO(fs.cat_file(f"{BUCKET}/{key}")), weights_only=True)["model"]


def test_a_run_on_s3_writes_its_files_as_objects_and_resumes_from_them(tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old bug wrote to a local folder named "s3:" here
    url = f"s3://{BUCKET}/run"
    over = {"schedule.max_steps": 6, "checkpoint.keep_last": 2}
    train(toy_args(tmp_path, out_dir=url, **over))
    assert objects(s3, "run") == ["checkpoints/step_00000004.pt", "checkpoints/step_00000006.pt",
                                  "config.yaml", "log.jsonl"]
    assert not (tmp_path / "s3:").exists()
    # config.yaml is the resolved config, loadable as is
    (tmp_path / "remote.yaml").write_bytes(s3.cat_file(f"{BUCKET}/run/config.yaml"))
    saved = load_config(tmp_path / "remote.yaml")
    assert saved.out_dir == url and saved.schedule.max_steps == 6
    # resume=auto on the bucket after losing the last checkpoint: from step 4, and the result is
    # the uninterrupted run's
    final = remote_params(s3, "run/checkpoints/step_00000006.pt")
    s3.rm_file(f"{BUCKET}/run/checkpoints/step_00000006.pt")
    t = train(toy_args(tmp_path, out_dir=url, resume="auto", **over))
    assert t.step == 6
    for k, v in remote_params(s3, "run/checkpoints/step_00000006.pt").items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)
    rows = s3.cat_file(f"{BUCKET}/run/log.jsonl").decode().splitlines()
    assert [int(r.split('"step": ')[1].split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
    # an explicit remote checkpoint, into a local run directory
    t = train(toy_args(tmp_path / "local", resume=f"{url}/checkpoints/step_00000004.pt", **over))
    assert t.step == 6
    local = torch.load(tmp_path / "local" / "run" / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    for k, v in local.items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)


def test_a_failed_checkpoint_upload_never_appears_under_its_name(tmp_path, s3, monkeypatch):
    from trainer import checkpoint as ckpt_mod

    ck = ckpt_mod.Checkpointer(f"s3://{BUCKET}/c", keep_last=2, is_main=True)
    ck.save({"step": 1}, 1)
    real_save = torch.save

    def torn_save(obj, f):  # killed half way through writing the bytes
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(OSError):
        ck.save({"step": 2}, 2)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert objects(s3, "c") == ["step_00000001.pt"]
    assert ck.latest() == f"s3://{BUCKET}/c/step_00000001.pt"
    assert ckpt_mod.Checkpointer.load(ck.latest()) == {"step": 1}
    tmp_after = set(os.listdir(tempfile.gettempdir()))
    assert not [n for n in tmp_after - tmp_before if "step_00000002" in n]  # no local temporary left


def test_remote_run_directories_that_cannot_work_are_one_line(tmp_path, s3, monkeypatch, capsys):
    args = toy_args(tmp_path)
    cases = [
        ("out_dir=http://127.0.0.1:9/run", "config key 'out_dir': http:// is not supported for a run directory"),
        ("out_dir=s3://no-such-bucket/run", "config key 'out_dir': bucket no-such-bucket not found"),
        (f"checkpoint.dir=ftp://{BUCKET}/c", "config key 'checkpoint.dir': ftp:// is not supported"),
    ]
    for override, message in cases:
        with pytest.raises(UserError) as e:
            Trainer(load_config(args[0], args[1:] + [override]))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), override
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the s3 extra were not installed
    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"out_dir=s3://{BUCKET}/run"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: config key 'out_dir': s3:// needs the s3fs package: pip install 'shardify-kd[s3]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "s3:").exists()
