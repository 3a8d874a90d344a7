"""Holes that no earlier test looked for: each one lost work, hung, crashed or let a user's
mistake through. Each test here failed before its fix (see the issue's item 8)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagenet_fixtures as fx
from imagenet_fixtures import run_cli, shard

REPO = Path(__file__).resolve().parents[1]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def rejects_of(out: Path) -> list[dict]:
    path = out / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def written_keys(out: Path) -> set[str]:
    import tarfile

    keys = set()
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys |= {m.name.partition(".")[0] for m in tar}
    return keys


# ---------------------------------------------------------------- listing: links, pipes, names
def test_a_symlinked_class_folder_is_read(tmp_path):
    """How cluster users assemble ImageNet: train/<synset> -> /elsewhere/<synset>. Its images
    were neither written nor rejected (inputs = written + rejected held without them)."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=4, specials=False)
    elsewhere = tmp_path / "elsewhere" / fx.SYNSETS[0]
    elsewhere.parent.mkdir()
    (src / "train" / fx.SYNSETS[0]).rename(elsewhere)
    (src / "train" / fx.SYNSETS[0]).symlink_to(elsewhere, target_is_directory=True)
    out = tmp_path / "out"
    shard(src, out, "--split", "train")
    info = manifest_of(out)["splits"]["train"]
    assert (info["inputs"], info["samples"], info["rejected"]) == (12, 12, 0)
    assert {f"{fx.SYNSETS[0]}_{i:05d}" for i in range(4)} <= written_keys(out)
    run_cli("verify", out, "--full", "--no-progress")


def test_a_link_that_loops_is_rejected_with_a_reason_and_the_run_ends(tmp_path):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    (src / "train" / fx.SYNSETS[1] / "again").symlink_to(src / "train", target_is_directory=True)
    out = tmp_path / "out"
    shard(src, out, "--split", "train")
    info = manifest_of(out)["splits"]["train"]
    assert (info["inputs"], info["samples"], info["rejected"]) == (7, 6, 1)
    [rej] = rejects_of(out)
    assert rej["reason"] == "ignored_file" and "loop" in rej["detail"]
    assert rej["source"] == f"train/{fx.SYNSETS[1]}/again/"


def test_a_named_pipe_among_the_images_is_rejected_without_being_opened(tmp_path):
    """A FIFO nobody writes to used to block its worker, and so the run, forever."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    os.mkfifo(src / "train" / fx.SYNSETS[0] / f"{fx.SYNSETS[0]}_77777.JPEG")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--out", str(out),
           "--split", "train", "--no-progress", "--max-reject-rate", "0.5"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run hangs on a named pipe") from None
    assert done.returncode == 0, done.stderr
    assert "inputs = written + rejected: 7 = 6 + 1" in done.stdout
    [rej] = rejects_of(out)
    assert rej["reason"] == "ignored_file" and "named pipe" in rej["detail"]
    assert rej["key"] == f"train_{fx.SYNSETS[0]}_{fx.SYNSETS[0]}_77777_JPEG"


def test_a_file_name_that_is_not_utf8_is_written_under_a_safe_key(tmp_path):
    """It crashed the listing digest with a UnicodeEncodeError traceback."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    folder = os.fsencode(src / "train" / fx.SYNSETS[2])
    with open(folder + b"/" + fx.SYNSETS[2].encode() + b"_caf\xe9.JPEG", "wb") as f:  # Latin-1 name
        f.write(fx.jpeg_bytes(5))
    out = tmp_path / "out"
    result = shard(src, out, "--split", "train")
    assert "inputs = written + rejected: 7 = 7 + 0" in result.output
    key = f"{fx.SYNSETS[2]}_caf_xe9"
    assert key in written_keys(out)
    import webdataset as wds

    samples = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)}
    meta = json.loads(samples[key]["json"])
    assert meta["source"] == f"train/{fx.SYNSETS[2]}/{fx.SYNSETS[2]}_caf\\xe9.JPEG"
    assert int(samples[key]["cls"]) == 2
    run_cli("verify", out, "--full", "--no-progress")


# ---------------------------------------------------------------- signals and orphans
def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_blocking(src: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", fx.BLOCKING_SHARDIFY, "imagenet", "--source", str(src), "--out", str(out),
           "--samples-per-shard", "2", "--workers", "2", "--no-progress", "--split", "train"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= 2:
            time.sleep(1.0)  # let them pick up tasks (one blocks)
            return proc, kids
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the workers never started")


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def reap():
    """Kill whatever a failed test leaves running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_ends_the_run_like_ctrl_c_and_its_workers_with_it(tmp_path, reap, group):
    """`kill PID` (what users and schedulers send) left the workers writing shards as orphans;
    `scancel` signals every process of the step."""
    proc, kids = _start_blocking(fx.blocking_source(tmp_path / "src"), tmp_path / "out")
    reap += [proc.pid, *kids]
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)  # the main process only
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("SIGTERM did not end the run") from None
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "terminated (SIGTERM): rerun the same command to resume" in err
    assert _gone_within(kids, 10), "workers outlived the main process"


def test_workers_die_with_a_main_process_killed_outright(tmp_path, reap):
    proc, kids = _start_blocking(fx.blocking_source(tmp_path / "src"), tmp_path / "out")
    reap += [proc.pid, *kids]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=20)
    assert _gone_within(kids, 10), "workers outlived the main process"


# ---------------------------------------------------------------- one run per --out (and node)
def _tmp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)


def test_a_second_run_into_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, reap):
    """The second run deleted the first's temporary files, and the first died with ENOENT."""
    src = fx.blocking_source(tmp_path / "src")
    out = tmp_path / "out"
    proc, kids = _start_blocking(src, out)
    reap += [proc.pid, *kids]
    temporaries = _tmp_files(out)
    assert temporaries  # the blocked worker's shard
    result = shard(src, out, "--split", "train", "--samples-per-shard", 2, expect=2)  # same options
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "is being written by another shardify run" in lines[0], result.output
    assert f"pid {proc.pid} on " in lines[0] and "node rank 0 of 1" in lines[0]
    assert _tmp_files(out) == temporaries and proc.poll() is None  # the first run is untouched
    os.kill(proc.pid, signal.SIGKILL)  # its lock file stays behind, with nobody holding it
    proc.communicate(timeout=20)
    assert _gone_within(kids, 10)
    assert list((out / ".shardify" / "locks").iterdir())
    result = shard(src, out, "--split", "train", "--samples-per-shard", 2)  # the first run's options
    assert "inputs = written + rejected: 13 = 13 + 0" in result.output
    run_cli("verify", out, "--no-progress")


_HOLD = (
    "import sys\n"
    "from pathlib import Path\n"
    "from shardify.outlock import out_lock\n"
    "with out_lock(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


@pytest.fixture
def hold_lock(reap):
    """hold_lock(out, rank, nodes): another process holds that node's lock until the test ends."""
    procs = []

    def hold(out: Path, rank: int, nodes: int) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), str(rank), str(nodes)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        reap.append(proc.pid)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=20)


def test_nodes_of_one_job_write_side_by_side_but_not_with_another_node_count(tmp_path, hold_lock):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    out = tmp_path / "out"
    holder = hold_lock(out, 0, 2)  # node 0 of 2 is writing
    shard(src, out, "--split", "train", "--num-nodes", 2, "--node-rank", 1)  # its peer: fine
    refused = shard(src, out, "--split", "train", "--num-nodes", 2, "--node-rank", 0, expect=2)
    assert f"pid {holder.pid} on " in refused.output and "node rank 0 of 2" in refused.output
    for other in (["--num-nodes", 1], ["--num-nodes", 3, "--node-rank", 2]):  # cleans the others' files
        refused = shard(src, out, "--split", "train", *other, expect=2)
        assert "is being written by another shardify run" in refused.output
    holder.stdin.close()
    holder.wait(timeout=20)
    shard(src, out, "--split", "train", "--num-nodes", 2, "--node-rank", 0)
    result = run_cli("finalize", out)
    assert "inputs = written + rejected: 6 = 6 + 0" in result.output
    assert not (out / ".shardify" / "locks").exists()  # released and removed


def test_tasks_of_one_array_starting_at_the_same_instant_both_run(tmp_path):
    """Node 1 has just locked its file and not yet written who it is when node 0 looks: node 0
    waits for the record instead of refusing an unknown holder (seen in a 2-task test run)."""
    import fcntl
    import threading

    from shardify import outlock, state
    from shardify.format import ShardifyError

    path = state.lock_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"host": "h", "pid": 1, "node_rank": 1, "num_nodes": 2}
    writer = threading.Timer(0.3, lambda: os.write(fd, json.dumps(record).encode()))
    writer.start()
    try:
        with outlock.out_lock(tmp_path, 0, 2):
            pass
        writer.join()
        with pytest.raises(ShardifyError, match="node rank 1 of 2"):  # a single-node run is still refused
            with outlock.out_lock(tmp_path, 0, 1):
                pass
    finally:
        writer.cancel()
        os.close(fd)


def test_a_refused_run_into_a_new_directory_leaves_nothing_behind(tmp_path, hold_lock):
    out = tmp_path / "new" / "out"
    hold_lock(tmp_path / "held", 0, 1)
    src = fx.write_imagefolder(tmp_path / "src", per_class=1, specials=False)
    shard(src, out, "--split", "nope", expect=2)  # refused before the lock: nothing made
    assert not (tmp_path / "new").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text("{}")
    shard(src, tmp_path / "done", expect=2)  # refused after the lock (no work state): none left
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["manifest.json"]


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    """Some Lustre and NFS mounts answer flock with an error: a live holder on this host still
    refuses the run, a dead one is taken over with a warning."""
    import errno
    import socket

    from shardify import outlock, state
    from shardify.format import ShardifyError

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outlock.fcntl, "flock", no_flock)
    path = state.lock_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "node_rank": 0, "num_nodes": 1}
    path.write_text(json.dumps(holder))  # this very test process: alive
    with pytest.raises(ShardifyError, match=f"pid {os.getpid()} on "):
        with outlock.out_lock(tmp_path, 0, 1):
            pass
    assert json.loads(path.read_text()) == holder  # the holder's file is left alone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({**holder, "pid": dead.pid}))
    logs = []
    with outlock.out_lock(tmp_path, 0, 1, logs.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and "file system without locks" in logs[0]
    assert not path.exists()


# ---------------------------------------------------------------- option values
@pytest.mark.parametrize("value", ["nan", "-nan", "NaN"])
def test_a_reject_rate_that_is_not_a_number_is_refused(tmp_path, value):
    """nan compares false with everything: the check let 20% rejects pass with exit 0."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=1)  # 3 good + 7 bad inputs
    out = tmp_path / "out"
    result = run_cli("imagenet", "--source", src, "--out", out, "--max-reject-rate", value, expect=2)
    assert f"Invalid value for '--max-reject-rate': '{value}' is not a finite number" in result.output
    assert not out.exists()
    assert "is not a finite number" in run_cli("finalize", tmp_path, "--max-reject-rate", value, expect=2).output


@pytest.mark.parametrize("option", ["--timeout", "--backoff", "--host-rate"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_download_options_that_are_not_finite_are_refused(tmp_path, option, value):
    """nan compares false with every bound, so click's FloatRange let it through to the
    downloader; inf is refused too (an endless --timeout lets one silent host stall a worker)."""
    src = tmp_path / "list.tsv"
    src.write_text("url\tcaption\nhttp://127.0.0.1:9/a.jpg\ta\n")
    out = tmp_path / "out"
    result = run_cli("pairs", "urls", "--source", src, "--out", out, option, value, expect=2)
    assert f"Invalid value for '{option}': '{value}' is not a finite number" in result.output
    assert not out.exists()


def test_workers_are_capped_at_the_shards_and_too_many_are_warned_about(tmp_path, monkeypatch):
    """`--workers 400` on 2 shards forked 400 processes."""
    from concurrent.futures import ProcessPoolExecutor

    from shardify import workers

    pools = []

    class Recording(ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=min(max_workers, 4), **kwargs)  # never hundreds, even failing

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recording)
    src = fx.write_imagefolder(tmp_path / "src", per_class=3, specials=False)  # 9 inputs: 2 shards of 5
    result = shard(src, tmp_path / "out", "--split", "train", "--workers", 400)
    assert pools == [2]
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --workers 400 is more than the {len(os.sched_getaffinity(0))} CPU cores "
                        "this process may use"]
    assert "inputs = written + rejected: 9 = 9 + 0" in result.output


# ---------------------------------------------------------------- verify
def test_verify_refuses_a_manifest_whose_classes_were_reordered(tmp_path):
    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    out = tmp_path / "out"
    shard(src, out)
    assert run_cli("verify", out, "--no-progress").output.strip().endswith(": OK")
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    classes = doc["classes"]
    classes[0], classes[1] = classes[1], classes[0]  # labels 0 and 1 now name each other's synset
    path.write_text(json.dumps(doc, indent=1))
    result = run_cli("verify", out, "--no-progress", "--sample-per-shard", 0, expect=1)
    problems = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, result.output
    assert "the manifest's classes do not match the samples: 8 sample(s)" in problems[0]  # 2 classes x 2 x train+val
    assert "reordered" in problems[0]
