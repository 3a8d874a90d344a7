"""shardify never loses a sample silently, never hangs, and says in one line what went wrong.

Each test reproduces one way a user lost data, waited forever or got a traceback."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import imagenet_fixtures as fx
from imagenet_fixtures import run_cli, shard
from shardify.cli import main

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(out: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _blocking_source(root: Path) -> Path:
    """An ImageFolder copy whose worker reading one image blocks (see fx.BLOCKING_SHARDIFY), so
    the test can kill it (or press Ctrl-C) while the job is certainly running."""
    return fx.blocking_source(root)


def _start(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", fx.BLOCKING_SHARDIFY, "imagenet", "--source", str(src), "--out", str(out),
           "--samples-per-shard", "2", "--workers", "2", "--no-progress", "--split", "train"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, n: int = 2) -> list[int]:
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= n:
            time.sleep(1.0)  # let them pick up tasks (one blocks on the FIFO)
            return kids
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the workers never started")


def test_a_killed_worker_ends_the_run_with_one_line(tmp_path):
    proc = _start(_blocking_source(tmp_path / "src"), tmp_path / "out")
    kids = _wait_for_workers(proc)
    for kid in kids:  # the OOM killer picks one; kill them all so the blocked one goes too
        os.kill(kid, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the main process hangs after its workers died") from None
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert "error: a worker process died" in err and "rerun the same command" in err


@pytest.mark.slow
def test_ctrl_c_with_several_workers_ends_promptly(tmp_path):
    """With the progress bar on and workers busy, Ctrl-C used to hang about half the time."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=50, specials=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        cmd = [sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--out", str(out),
               "--samples-per-shard", "2", "--workers", "4", "--hash-thread", "on", "--split", "train"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 3 + 8 * trial:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints where it hangs
            try:
                _, err = proc.communicate(timeout=10)
            finally:
                with contextlib.suppress(ProcessLookupError):  # SIGABRT may have ended it
                    os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"trial {trial}: Ctrl-C did not end the run:\n{err[-5000:]}") from None
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted: rerun" in err
        rerun = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, env=env)
        assert rerun.returncode == 0, rerun.stderr


def test_an_error_exit_does_not_wait_for_a_pool_thread_a_forced_stop_left_running(tmp_path):
    """After Ctrl-C or a dead worker, a pool's manager thread can stay blocked on a killed
    worker's pipe; the interpreter's exit would join it forever. A stand-in thread that never
    ends plays that part: the one-line error must still end the process."""
    script = (
        "import threading, sys\n"
        "from shardify import workers\n"
        "from shardify.cli import main\n"
        "t = threading.Thread(target=threading.Event().wait, name='stuck-manager')\n"
        "t.start()\n"
        "workers._stuck.append(t)\n"
        f"main(['imagenet', '--source', {str(tmp_path / 'missing')!r}, '--out', {str(tmp_path / 'out')!r}])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.startswith("error: --source") and len(r.stderr.splitlines()) == 1, r.stderr


def _cli_process(tmp_path: Path, src: Path, prelude: str, entry: str = "run") -> subprocess.CompletedProcess:
    """`shardify imagenet` as the program runs it (`run()` on sys.argv), after `prelude`, with
    an atexit hook that leaves a marker file: whether the interpreter's exit sequence ran."""
    args = ["shardify", "imagenet", "--source", str(src), "--out", str(tmp_path / "out"), "--split", "train",
            "--samples-per-shard", "5", "--workers", "2", "--no-progress"]
    script = (
        "import atexit, pathlib, sys, threading, time\n"
        f"atexit.register(pathlib.Path({str(tmp_path / 'atexit-ran')!r}).touch)\n"
        f"{prelude}\n"
        f"sys.argv = {args!r}\n"
        f"from shardify.cli import {entry}\n"
        f"{entry}()\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_finished_run_skips_the_interpreter_teardown_and_keeps_its_output(tmp_path, small):
    r = _cli_process(tmp_path, small, "")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # a pipe: everything still buffered at exit must have been flushed
    assert lines[0].startswith("train: inputs = written + rejected: ") and lines[-1].endswith("manifest.json"), lines
    assert not (tmp_path / "atexit-ran").exists()  # left with os._exit
    assert run_cli("verify", tmp_path / "out").exit_code == 0


def test_main_called_from_python_exits_the_usual_way(tmp_path, small):
    """Only the program (`run`) skips the teardown: `main()` in a notebook raises SystemExit."""
    r = _cli_process(tmp_path, small, "", entry="main")
    assert r.returncode == 0 and (tmp_path / "atexit-ran").exists(), r.stderr


def test_the_normal_exit_runs_while_another_thread_is_still_working(tmp_path, small):
    """A thread still at work (none of shardify's, but a caller's or a library's) must not be
    cut off: the process then ends the normal way, which waits for it."""
    done = tmp_path / "thread-finished"
    # the thread works until just after the run wrote its manifest (however long the run takes
    # on a loaded machine), so it is surely still at work when the run ends
    manifest = tmp_path / "out" / "manifest.json"
    work = (f"lambda: ([time.sleep(0.05) for _ in range(2400) if not pathlib.Path({str(manifest)!r}).exists()], "
            f"time.sleep(1), pathlib.Path({str(done)!r}).touch())")
    r = _cli_process(tmp_path, small, f"threading.Thread(target={work}).start()")
    assert r.returncode == 0, r.stderr
    assert done.exists() and (tmp_path / "atexit-ran").exists()


def test_the_progress_bar_of_a_2_worker_run_counts_every_input(tmp_path, small):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "shardify", "imagenet", "--source", str(small), "--out",
                        str(tmp_path / "out"), "--split", "train", "--samples-per-shard", "3", "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split("inputs = written + rejected: ")[1].split()[0])
    assert f"{n}/{n} " in r.stderr.replace("\r", "\n"), r.stderr  # tqdm's last state: all done


def test_an_error_exit_through_the_process_entry_is_one_line_with_its_status(tmp_path):
    r = _cli_process(tmp_path, tmp_path / "missing", "")
    assert r.returncode == 2 and r.stderr.startswith("error: --source") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "atexit-ran").exists()


# ------------------------------------------------------------------ data loss, silent output
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return fx.write_imagefolder(tmp_path_factory.mktemp("small") / "src", per_class=4, specials=False)


def test_overwrite_deletes_only_what_shardify_wrote(tmp_path):
    out = tmp_path / "out"
    src = fx.write_imagefolder(out / "my-source", per_class=4, specials=False)  # the source sits in --out
    out.mkdir(exist_ok=True)
    (out / "backup.tar").write_bytes(b"the user's own backup")
    (out / "notes.idx").write_text("mine")
    (out / "x.tar").mkdir()
    (out / "x.tar" / "inside.txt").write_text("keep me")
    shard(src, out)
    assert (out / "_info.json").exists()
    shard(src, out, "--seed", 7, "--overwrite")
    assert (out / "backup.tar").read_bytes() == b"the user's own backup"
    assert (out / "notes.idx").read_text() == "mine"
    assert (out / "x.tar" / "inside.txt").read_text() == "keep me"
    assert len(list((src / "train").rglob("*.JPEG"))) == 12
    assert json.loads((out / "manifest.json").read_text())["options"]["seed"] == 7
    assert run_cli("verify", out, "--no-progress").output.strip().endswith("OK")


def test_a_rerun_with_another_source_is_refused_and_changes_nothing(tmp_path):
    a = fx.write_imagefolder(tmp_path / "a", per_class=4, specials=False)
    b = fx.write_imagefolder(tmp_path / "b", per_class=2, specials=False)
    out = tmp_path / "out"
    shard(a, out)
    before = tree_bytes(out)
    result = shard(b, out, expect=2)
    assert "source.local_path" in result.output and str(b) in result.output and "--overwrite" in result.output
    assert tree_bytes(out) == before
    shard(b, out, "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["local_path"] == str(b) and manifest["splits"]["train"]["inputs"] == 6


def test_replaced_files_under_the_same_source_path_are_never_reused_from_staging(tmp_path):
    src = fx.write_archives(tmp_path / "src", per_class=4, specials=False)
    out = tmp_path / "out"
    shard(src, out, "--split", "validation")
    other = fx.write_archives(tmp_path / "other", per_class=2, specials=False)  # new archive, same name
    (src / "data" / "val_images.tar.gz").write_bytes((other / "data" / "val_images.tar.gz").read_bytes())
    shard(src, out, "--split", "validation")
    shard(src, tmp_path / "fresh", "--split", "validation")
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")
    assert json.loads((out / "manifest.json").read_text())["splits"]["validation"]["inputs"] == 6


def test_a_file_replaced_under_the_same_name_is_written_again(tmp_path):
    src = fx.write_imagefolder(tmp_path / "src", per_class=4, specials=False)
    out = tmp_path / "out"
    shard(src, out, "--split", "train")
    replaced = src / "train" / fx.SYNSETS[1] / f"{fx.SYNSETS[1]}_00002.JPEG"
    replaced.write_bytes(fx.jpeg_bytes(31337, size=(50, 40)))  # a fixed copy: same name, other bytes
    result = shard(src, out, "--split", "train")
    assert "changed since the last run" in result.output
    shard(src, tmp_path / "fresh", "--split", "train")
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")


def test_a_folder_that_cannot_be_listed_is_an_error(tmp_path, monkeypatch):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    locked = src / "train" / fx.SYNSETS[1]
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):  # as a chmod 000 folder does (tests may run as root)
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = CliRunner().invoke(main, ["imagenet", "--source", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: cannot list {locked}") and len(result.output.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_files_the_imagefolder_layout_does_not_read_are_rejected_not_dropped(tmp_path):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    folder = src / "train" / fx.SYNSETS[0]
    (folder / "readme.txt").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "x.JPEG").write_bytes(fx.jpeg_bytes(5))
    (src / "LOC_synset_mapping.txt").write_text("outside every split: not an input")
    out = tmp_path / "out"
    result = shard(src, out, "--split", "train")
    assert "inputs = written + rejected: 9 = 6 + 3" in result.output
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejects) == sorted(
        [f"train/{fx.SYNSETS[0]}/.DS_Store", f"train/{fx.SYNSETS[0]}/.ipynb_checkpoints/",
         f"train/{fx.SYNSETS[0]}/readme.txt"])
    assert {r["reason"] for r in rejects} == {"ignored_file"}


def test_a_directory_whose_work_state_was_deleted_is_not_extended(tmp_path, small):
    import shutil

    out = tmp_path / "out"
    shard(small, out, "--split", "train")
    shutil.rmtree(out / ".shardify")  # the docs say it may go once manifest.json exists
    before = tree_bytes(out)
    result = shard(small, out, "--split", "validation", expect=2)
    assert "no .shardify/ work state" in result.output and len(result.output.splitlines()) == 1
    assert tree_bytes(out) == before and not (out / ".shardify").exists()
    (out / "backup.tar").write_bytes(b"mine")
    shard(small, out, "--split", "validation", "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["validation"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["backup.tar", "validation-000000.tar",
                                                          "validation-000001.tar", "validation-000002.tar"]
    assert run_cli("verify", out, "--no-progress").output.strip().endswith("OK")


def test_shard_named_files_of_unknown_origin_are_refused(tmp_path, small):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    result = shard(small, out, "--overwrite", expect=2)
    assert "train-000000.tar" in result.output and "deletes only what it wrote" in result.output
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"


def test_overwrite_of_a_stateless_directory_with_strays_changes_nothing(tmp_path, small):
    import shutil

    out = tmp_path / "out"
    shard(small, out, "--split", "train")
    shutil.rmtree(out / ".shardify")
    (out / "train-000099.tar").write_bytes(b"not listed anywhere")
    before = tree_bytes(out)
    result = shard(small, out, "--overwrite", expect=2)
    assert "train-000099.tar" in result.output
    assert tree_bytes(out) == before
    (out / "train-000099.tar").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tool"]["name"] = "something-else"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = tree_bytes(out)
    result = shard(small, out, "--overwrite", expect=2)
    assert "not written by shardify" in result.output and tree_bytes(out) == before


def test_the_same_key_in_two_splits_is_refused(tmp_path):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    twin = src / "val" / fx.SYNSETS[0] / f"{fx.SYNSETS[0]}_00000.JPEG"  # also a train file name
    twin.write_bytes(fx.jpeg_bytes(4242))
    out = tmp_path / "out"
    shard(src, out, "--split", "train")
    before = tree_bytes(out)
    state_before = sorted(p.name for p in (out / ".shardify").rglob("*"))
    result = shard(src, out, "--split", "validation", expect=2)
    assert f"key '{fx.SYNSETS[0]}_00000'" in result.output and "'train'" in result.output
    assert tree_bytes(out) == before
    assert sorted(p.name for p in (out / ".shardify").rglob("*")) == state_before


def test_key_hash_files_are_the_npy_bytes_numpy_writes(tmp_path):
    """shardify writes its key hashes without importing numpy; numpy reads them back."""
    import io
    import random

    import numpy as np

    from shardify import state

    rng = random.Random(0)
    for n in (0, 1, 7, 5000):
        values = sorted(rng.getrandbits(64) for _ in range(n))
        state.write_uint64_npy(tmp_path / "k.npy", values)
        ref = io.BytesIO()
        np.save(ref, np.array(values, dtype=np.uint64), allow_pickle=False)
        assert (tmp_path / "k.npy").read_bytes() == ref.getvalue()
        assert np.load(tmp_path / "k.npy", allow_pickle=False).tolist() == values


def test_a_truncated_or_modified_shard_is_written_again_on_rerun(tmp_path, small):
    out, ref = tmp_path / "out", tmp_path / "ref"
    shard(small, ref)
    shard(small, out)
    with open(out / "train-000001.tar", "r+b") as f:  # cut short by something else
        f.truncate(4096)
    data = bytearray((out / "validation-000000.tar").read_bytes())
    data[1500] ^= 0xFF  # same size, other bytes
    (out / "validation-000000.tar").write_bytes(bytes(data))
    result = shard(small, out)
    assert result.output.count("(2 already complete)") == 2  # one shard of each split redone
    assert tree_bytes(out) == tree_bytes(ref)


# ------------------------------------------------------------------ verify, bad files
def _edit(key):
    def edits(m):
        tr = m["splits"]["train"]
        if key == "shard_rejected":
            tr["shards"][0]["rejected"] += 1
        elif key == "totals_bytes":
            m["totals"]["bytes"] += 1
        elif key == "fields":
            m["fields"] = ["jpg", "json"]
        elif key == "drop_shard":  # consistent counts, but a tar on disk the manifest omits
            sh = tr["shards"].pop()
            for d in (tr, m["totals"]):
                for k in ("samples", "inputs", "rejected", "bytes"):
                    d[k] -= sh[k]
        elif key == "split_rejects":
            for d in (tr, m["totals"]):
                d["rejected"] += 1
                d["inputs"] += 1
        elif key == "dataset":
            m["dataset"] = "not-imagenet"
        elif key == "shard_order":
            tr["shards"].reverse()
        elif key == "schema":
            m["schema_version"] = 7
        elif key == "escape":
            tr["shards"][0]["name"] = "../elsewhere.tar"
        elif key == "samples_type":
            tr["shards"][0]["samples"] = "3"
    return edits


@pytest.mark.parametrize("key", ["shard_rejected", "totals_bytes", "fields", "drop_shard", "split_rejects",
                                 "dataset", "shard_order", "schema", "escape", "samples_type"])
def test_verify_checks_every_claim_of_the_manifest(tmp_path, small, key):
    out = tmp_path / "out"
    shard(small, out, "--split", "train")
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(key)(manifest)
    path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "problem" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text", ["[]", "{}", '{"schema_version": 1, "dataset": "x"}', "not json"])
def test_a_bad_manifest_is_one_line_in_every_command(tmp_path, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    result = CliRunner().invoke(main, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1 and "manifest.json" in result.output, result.output
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def _one_line_error(result, name: str):
    """Exit 2 and one `error:` line naming the file (after the usual progress lines), no traceback."""
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last, result.output
    assert result.output.count("error") == 1 and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_tar_gz_is_one_line(tmp_path, damage, workers):
    src = fx.write_archives(tmp_path / "src", per_class=4, specials=False)
    archive = src / "data" / "train_images_1.tar.gz"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage, not gzip" * 100)
    result = CliRunner().invoke(main, ["imagenet", "--source", str(src), "--out", str(tmp_path / "out"),
                                       "--no-progress", "--split", "train", "--workers", str(workers)])
    _one_line_error(result, "data/train_images_1.tar.gz")


def test_a_truncated_parquet_file_is_one_line(tmp_path):
    src = fx.write_parquet(tmp_path / "src", per_class=4, specials=False)
    path = src / "data" / "train-00001-of-00002.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["imagenet", "--source", str(src), "--out", str(tmp_path / "out"),
                                       "--no-progress", "--split", "train"])
    _one_line_error(result, "train-00001-of-00002.parquet")


def test_a_truncated_local_webdataset_tar_is_one_line(tmp_path):
    src = fx.write_wds(tmp_path / "src", per_class=4, specials=False)
    path = src / "imagenet1k-train-0001.tar"
    path.write_bytes(path.read_bytes()[:700])
    result = CliRunner().invoke(main, ["imagenet", "--source", str(src), "--out", str(tmp_path / "out"),
                                       "--no-progress", "--split", "train"])
    _one_line_error(result, "imagenet1k-train-0001.tar")


def test_a_parquet_image_column_of_plain_bytes_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    rows = fx.good_images("train", per_class=2)
    table = pa.table({"image": pa.array([data for _, _, data in rows], pa.binary()),
                      "label": [fx.label_of(s) for _, s, _ in rows]})
    pq.write_table(table, src / "data" / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    result = shard(src, out, "--split", "train")
    assert "inputs = written + rejected: 6 = 6 + 0" in result.output
    assert run_cli("verify", out, "--no-progress").output.strip().endswith("OK")


def test_a_grid_path_without_an_extension_still_writes_a_png(tmp_path, small):
    from PIL import Image

    out = tmp_path / "out"
    shard(small, out, "--split", "train")
    run_cli("inspect", out, "--grid", tmp_path / "grid", "-n", 4)
    with Image.open(tmp_path / "grid") as img:
        assert img.format == "PNG"


# ------------------------------------------------------------------ readers users already have
@pytest.fixture(scope="module")
def with_specials(tmp_path_factory):
    """Shards of an ImageFolder copy where only some images are re-encoded (CMYK, PNG)."""
    root = tmp_path_factory.mktemp("specials")
    src = fx.write_imagefolder(root / "src", per_class=4, specials=True)
    out = root / "out"
    shard(src, out, "--samples-per-shard", 4)
    return out


def _urls(out: Path, split: str) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [str(out / sh["name"]) for sh in manifest["splits"][split]["shards"]]


def test_every_json_has_the_same_keys_so_hf_datasets_keeps_late_ones(tmp_path, with_specials):
    import datasets

    urls = _urls(with_specials, "train")
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    rows = {row["__key__"]: row["json"] for row in ds}
    assert len(rows) == 14  # 12 plain JPEGs, a CMYK JPEG and a PNG; the other specials are rejected
    reencoded = {k: v["reencoded_from"] for k, v in rows.items() if v["reencoded_from"]}
    assert reencoded == {f"{fx.SYNSETS[0]}_90001": "cmyk-jpeg", f"{fx.SYNSETS[1]}_90002": "png"}
    assert all(set(v) == {"source", "format", "width", "height", "reencoded_from", "synset"} for v in rows.values())


@pytest.mark.slow  # importing timm takes about 10 s
def test_timm_reads_the_shards_through_info_json(with_specials):
    pytest.importorskip("timm", reason="timm is a test extra: pip install -e '.[test]'")
    from timm.data import create_dataset

    manifest = json.loads((with_specials / "manifest.json").read_text())
    for split in ("train", "validation"):
        ds = create_dataset(f"wds/{fx.__name__}", root=str(with_specials), split=split, is_training=False,
                            batch_size=1, input_img_mode="RGB", input_key="jpg")  # target: the .cls member
        assert len(ds) == manifest["splits"][split]["samples"]
        labels = sorted(int(target) for _, target in ds)
        want = []
        for url in _urls(with_specials, split):
            import tarfile

            with tarfile.open(url) as tar:
                want += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
        assert labels == sorted(want)


def test_wids_reads_the_shards_through_its_index(with_specials):
    wids = pytest.importorskip("wids", reason="wids is a test extra: pip install -e '.[test]'")
    manifest = json.loads((with_specials / "manifest.json").read_text())
    index = with_specials / "wids-train.json"
    assert json.loads(index.read_text())["__kind__"] == "wids-shard-index-v1"
    ds = wids.ShardListDataset(str(index), transformations=[])
    assert len(ds) == manifest["splits"]["train"]["samples"]
    keys = [ds[i]["__key__"] for i in range(len(ds))]
    expected = []
    for sh in manifest["splits"]["train"]["shards"]:
        import tarfile

        with tarfile.open(with_specials / sh["name"]) as tar:
            expected += [m.name.split(".")[0] for m in tar if m.name.endswith(".jpg")]
    assert keys == expected
    sample = ds[0]
    assert sample[".jpg"] if ".jpg" in sample else sample["jpg"]


def test_open_clip_s_webdataset_pin_fits_our_requirements():
    """open_clip[training] pins webdataset<=0.2.86: our runtime requirements must allow it, which
    they can because shardify and the trainer never import webdataset."""
    import ast
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        if req.name == "webdataset":
            assert req.specifier.contains("0.2.86"), line
    for path in list((REPO / "shardify").rglob("*.py")) + list((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "webdataset" for n in names), f"{path} imports webdataset"


# ------------------------------------------------------------------ options checked before work
@pytest.mark.parametrize("args, message", [
    (["--split", "train", "--split", "train"], "--split train is given more than once"),
    (["--num-nodes", "2", "--node-rank", "2"], "--node-rank 2 is not in [0, 2)"),
    (["--samples-per-shard", "0"], "--samples-per-shard"),
    (["--workers", "0"], "--workers"),
    (["--max-reject-rate", "2"], "--max-reject-rate"),
])
def test_option_values_are_checked_before_any_work(tmp_path, small, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["imagenet", "--source", str(small), "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_an_output_inside_the_source_is_refused(tmp_path):
    src = fx.write_wds(tmp_path / "src", per_class=2, specials=False)  # our shard names match this layout
    result = CliRunner().invoke(main, ["imagenet", "--source", str(src), "--out", str(src / "shards")])
    assert result.exit_code == 2 and "lies inside --source" in result.output, result.output
    assert not (src / "shards").exists()


@pytest.mark.parametrize("args", [["verify", "--sample-per-shard", "-1"], ["inspect", "-n", "0"]])
def test_verify_and_inspect_options_are_checked(tmp_path, args):
    result = CliRunner().invoke(main, [args[0], str(tmp_path), *args[1:]])
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_bench_shardify_with_a_missing_image_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_shardify.py"), "--images",
                           str(tmp_path / "nope"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no such folder" in proc.stderr


def test_damaged_work_state_is_one_line(tmp_path, small):
    out = tmp_path / "out"
    shard(small, out, "--split", "train")
    (out / ".shardify" / "job.json").write_text('{"fingerprint": ')
    for args in (["imagenet", "--source", str(small), "--out", str(out), "--split", "train"], ["finalize", str(out)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "job.json is damaged" in result.output, result.output
