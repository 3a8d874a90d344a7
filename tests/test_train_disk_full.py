"""A full disk is one line naming the file, never a traceback: a checkpoint that does not fit
keeps the previous one; a log.jsonl that cannot be written lets training go on and stops the run
at its next checkpoint.

The checkpoint test fills a real tiny tmpfs when the tests run as root (mount allowed) and
otherwise makes torch.save fail half way with ENOSPC, as a full disk does."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides
from trainer.cli import main


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A directory on a 700 KiB file system (one ~430 KB checkpoint fits, a second does not)."""
    d = tmp_path / "small"
    d.mkdir()
    real = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(d)],
                                                capture_output=True).returncode == 0
    if not real:
        from trainer import checkpoint as ckpt_mod

        save = torch.save

        def fill_up(obj, f):  # the first checkpoint fits; the next hits the end of the disk half way
            if any(p.name.startswith("step_") and ".tmp" not in p.name for p in d.iterdir()):
                f.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            save(obj, f)

        monkeypatch.setattr(ckpt_mod.torch, "save", fill_up)
    yield d
    if real:
        subprocess.run(["umount", str(d)], check=True)


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous(tmp_path, teacher, small_disk, capsys):
    args = tiny_overrides(tmp_path, teacher, **{"checkpoint.dir": str(small_disk), "checkpoint.keep_last": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", str(DEMO_CONFIG), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "enforce fail" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"error: cannot write checkpoint {small_disk / 'step_00000008.pt'}: No space left on device "
                    f"(the previous checkpoint step_00000004.pt is kept: free space, then continue with resume=auto)")
    assert sorted(p.name for p in small_disk.iterdir()) == ["step_00000004.pt"]  # no temporary left
    assert torch.load(small_disk / "step_00000004.pt", weights_only=True)["step"] == 4


def test_a_failed_log_write_stops_the_run_at_the_next_checkpoint(tmp_path, teacher, monkeypatch, capsys):
    from trainer import logs

    real_open = open
    written = []

    class FullAfter:  # log.jsonl on a disk that fills up after two records
        def __init__(self, f):
            self.f = f

        def write(self, s):
            if len(written) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(s)
            return self.f.write(s)

        def close(self):
            self.f.close()

    def fake_open(path, *a, **k):
        f = real_open(path, *a, **k)
        return FullAfter(f) if Path(path).name == "log.jsonl" else f

    monkeypatch.setattr(logs, "open", fake_open, raising=False)
    # log every step, checkpoint every 4: the third record (step 3) fails; steps 3 and 4 still train
    args = tiny_overrides(tmp_path, teacher, **{"logging.every_steps": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", str(DEMO_CONFIG), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    log = tmp_path / "run" / "log.jsonl"
    assert f"warning: cannot write {log} (No space left on device) since step 3; training goes on" in err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write {log} (No space left on device) since step 3: stopped after writing checkpoint "
        f"{tmp_path / 'run' / 'checkpoints' / 'step_00000004.pt'}; free space, then continue with resume=auto")
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004.pt"]
