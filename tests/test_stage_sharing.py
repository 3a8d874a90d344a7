"""One download however many tasks: each staged unit is streamed by one task of a multi-node job.

The hub tests run real `shardify` processes against the stand-in hub on 127.0.0.1, each task
with its own HF_TOKEN, so the server sees which task read which file. The claim tests drive
shardify.staging in-process with a counting streamer: a task resumes its own claims at once,
waits for a live peer's unit, takes over an abandoned one, and gives a unit up when taken over.
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

import imagenet_fixtures as fx
from fake_hub import FakeHub, hub_env
from shardify import stage_claims, staging, state
from shardify.sources.base import ListContext

COMMON = ["--samples-per-shard", "5", "--max-reject-rate", "0.5", "--no-progress", "--workers", "2"]
WRITERS = {"archives": lambda root: fx.write_archives(root, n_train_archives=4),
           "parquet": lambda root: fx.write_parquet(root, files_per_split=4)}


def _shardify(hub, home: Path, out: Path, token: str, *extra) -> subprocess.Popen:
    env = {**hub_env(hub.url, home), "HF_TOKEN": token}
    return subprocess.Popen([sys.executable, "-m", "shardify", "imagenet", "--out", str(out), *COMMON, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return err


def _finalize(out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shardify", "finalize", str(out), "--max-reject-rate", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _data_reads(hub, *tokens: str) -> dict[str, set]:
    """Which of `tokens` read each data file."""
    readers = defaultdict(set)
    for rel, auth in hub.sent:
        if rel.startswith("data/") and auth in {f"Bearer {t}" for t in tokens}:
            readers[rel].add(auth)
    return readers


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file of the dataset: the shards, their indexes and the manifest (not the work state)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _data_files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / "data").iterdir()}


@pytest.mark.parametrize("layout", ["archives", "parquet"])
def test_two_tasks_read_each_file_once_and_equal_one_task(tmp_path, layout):
    repo = WRITERS[layout](tmp_path / "repo")
    with FakeHub({"ILSVRC/imagenet-1k": repo}) as hub:
        _wait(_shardify(hub, tmp_path / "home0", tmp_path / "one", "solo"))
        tasks = [_shardify(hub, tmp_path / f"home{r + 1}", tmp_path / "two", f"task-{r}",
                           "--num-nodes", "2", "--node-rank", str(r)) for r in range(2)]
        for proc in tasks:
            _wait(proc)
    _finalize(tmp_path / "two")

    readers = _data_reads(hub, "task-0", "task-1")
    assert set(readers) == _data_files(repo)  # every input file was read ...
    assert all(len(tokens) == 1 for tokens in readers.values()), readers  # ... by one task only
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sorted(one) == sorted(two) and "manifest.json" in one
    assert [name for name in one if one[name] != two[name]] == []  # byte for byte
    # nothing of the coordination is left: no claims, no half-written staging files
    stage = state.stage_dir(tmp_path / "two")
    assert not [p for p in stage.rglob("*") if ".claim-" in p.name or state.TMP_MARK in p.name]


def test_a_task_whose_peer_never_starts_stages_everything(tmp_path):
    """An array throttled to one task at a time: task 0 runs alone to the end (no deadlock
    waiting for task 1), then task 1 finds every unit staged and downloads nothing."""
    repo = WRITERS["archives"](tmp_path / "repo")
    with FakeHub({"ILSVRC/imagenet-1k": repo}) as hub:
        _wait(_shardify(hub, tmp_path / "h0", tmp_path / "one", "solo"))
        _wait(_shardify(hub, tmp_path / "h1", tmp_path / "two", "task-0", "--num-nodes", "2", "--node-rank", "0"))
        _wait(_shardify(hub, tmp_path / "h2", tmp_path / "two", "task-1", "--num-nodes", "2", "--node-rank", "1"))
    _finalize(tmp_path / "two")
    assert set(_data_reads(hub, "task-0")) == _data_files(repo)
    assert _data_reads(hub, "task-1") == {}  # the second task read no data file
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")


# A `shardify` process that stalls forever in the middle of staging train_images_1.tar.gz (after
# its first image), so a test can kill it there.
STALLING_SHARDIFY = (
    "import threading\n"
    "from shardify.sources import imagenet\n"
    "stream = imagenet.ImageNetSource._stream_unit\n"
    "def stalling(self, split, rel):\n"
    "    for n, entry in enumerate(stream(self, split, rel)):\n"
    "        if n == 1 and rel.endswith('train_images_1.tar.gz'):\n"
    "            threading.Event().wait()\n"
    "        yield entry\n"
    "stalling.__name__ = '_stream_unit'  # staging processes get it by name (pickled bound method)\n"
    "imagenet.ImageNetSource._stream_unit = stalling\n"
    "from shardify.cli import run\n"
    "run()\n"
)


def test_a_task_killed_while_staging_resumes_at_once(tmp_path):
    """SIGKILL in the middle of a unit leaves its claim and half-written files; the rerun of
    the same task takes the unit over at once (no lease to wait for) and the job's shards equal
    a one-task run's."""
    repo = WRITERS["archives"](tmp_path / "repo")
    args = ["imagenet", "--source", str(repo), *COMMON, "--split", "train"]
    one = subprocess.run([sys.executable, "-m", "shardify", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    task0 = [*args, "--out", str(tmp_path / "two"), "--num-nodes", "2", "--node-rank", "0"]
    proc = subprocess.Popen([sys.executable, "-c", STALLING_SHARDIFY, *task0], stderr=subprocess.PIPE, text=True)
    stage = state.stage_dir(tmp_path / "two", "train")
    deadline = time.monotonic() + 60
    while not list(stage.glob(f".data__train_images_1.tar.gz.bin{state.TMP_MARK}*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the unit now
    proc.kill()
    proc.wait()
    assert (stage / "data__train_images_1.tar.gz.claim-0").exists()  # the dead run's claim ...
    started = time.monotonic()
    for rank in (0, 1):
        rerun = subprocess.run([sys.executable, "-m", "shardify", *task0[:-1], str(rank)],
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    assert time.monotonic() - started < stage_claims.LEASE_S  # ... taken over without waiting
    _finalize(tmp_path / "two")
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")
    assert not [p for p in stage.iterdir() if ".claim-" in p.name or state.TMP_MARK in p.name]


# ---------------------------------------------------------------- claims, in-process
class CountingStreamer:
    """Three entries per unit; counts which units it streamed (in this process)."""

    def __init__(self, delay: float = 0.0):
        self.streamed: list[str] = []
        self.delay = delay

    def __call__(self, unit: str):
        self.streamed.append(unit)
        for i in range(3):
            time.sleep(self.delay)
            yield f"{unit}-{i}", f"{unit}:{i}", f"{unit}/{i}".encode(), {"i": i}


def _ctx(tmp_path: Path, rank: int, nodes: int) -> ListContext:
    return ListContext(stage_dir=tmp_path / "stage", workers=1, progress=lambda desc, n: None,
                       show_progress=True, node_rank=rank, num_nodes=nodes)


def _stage(streamer, units, ctx) -> list[tuple[str, bytes]]:
    reader = staging.LocalFileReader()
    items = [(it.key, reader.read_at(*it.loc)) for it in staging.stage_units(streamer, units, ctx.stage_dir, ctx)]
    reader.close()
    return items


def _write_claim(stage: Path, unit: str, task: str, pid: int, generation: int = 0) -> Path:
    stage.mkdir(parents=True, exist_ok=True)
    path = stage / f"{staging.safe_name(unit)}.claim-{generation}"
    path.write_text(json.dumps({"task": task, "host": "elsewhere", "pid": pid}))
    return path


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(stage_claims, "LEASE_S", 1.0)
    monkeypatch.setattr(stage_claims, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(staging, "_POLL_S", (0.02, 0.1))


def test_work_order_puts_own_units_first_and_others_from_the_back():
    units = [f"u{i}" for i in range(7)]
    assert stage_claims.work_order(units, 0, 1) == units
    assert stage_claims.work_order(units, 1, 3) == ["u1", "u4", "u6", "u5", "u3", "u2", "u0"]
    for rank in range(3):  # every unit once, for every task
        assert sorted(stage_claims.work_order(units, rank, 3)) == units


def test_a_rerun_takes_over_its_own_claims_at_once(tmp_path, quick):
    ctx = _ctx(tmp_path, 0, 2)
    _write_claim(ctx.stage_dir, "a", "node-0-of-2", pid=4242)  # this task's earlier run, killed
    half = ctx.stage_dir / f".a.bin{state.TMP_MARK}elsewhere-4242"
    half.write_bytes(b"half an archive")
    streamer = CountingStreamer()
    started = time.monotonic()
    items = _stage(streamer, ["a", "b"], ctx)
    assert time.monotonic() - started < stage_claims.LEASE_S  # no waiting for a lease
    assert [k for k, _ in items] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert items[4][1] == b"b/1"
    assert sorted(streamer.streamed) == ["a", "b"]  # b: the peer's unit, nobody held it
    assert not half.exists()  # the earlier run's half-written file is gone
    assert not list(ctx.stage_dir.glob("*.claim-*"))


def test_a_single_node_run_takes_over_any_claim_at_once(tmp_path, quick):
    """A single-node run is alone in the directory (its lock refuses runs with another
    --num-nodes), so claims left by a killed multi-node run are dead."""
    ctx = _ctx(tmp_path, 0, 1)
    _write_claim(ctx.stage_dir, "b", "node-1-of-2", pid=4244)
    started = time.monotonic()
    assert len(_stage(CountingStreamer(), ["a", "b"], ctx)) == 6
    assert time.monotonic() - started < stage_claims.LEASE_S


def test_a_live_peers_unit_is_waited_for_not_streamed(tmp_path, quick):
    ctx = _ctx(tmp_path, 0, 2)
    peer_streamer = CountingStreamer()
    ctx.stage_dir.mkdir(parents=True)
    held = stage_claims.claim(ctx.stage_dir, "b", "node-1-of-2", None)
    assert held is not None and held.generation == 0

    def peer() -> None:  # heartbeats for three leases, then finishes staging b as the peer would
        with stage_claims.Heartbeat(held):
            time.sleep(3 * stage_claims.LEASE_S)
        staging._stage_one((peer_streamer, "b", str(ctx.stage_dir), False, "node-1-of-2", held))

    thread = threading.Thread(target=peer)
    thread.start()
    streamer = CountingStreamer()
    items = _stage(streamer, ["a", "b"], ctx)
    thread.join()
    assert streamer.streamed == ["a"] and peer_streamer.streamed == ["b"]
    assert [k for k, _ in items] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]


def test_an_abandoned_claim_is_taken_over_after_the_lease(tmp_path, quick, capsys):
    ctx = _ctx(tmp_path, 0, 2)
    _write_claim(ctx.stage_dir, "b", "node-1-of-2", pid=4243)  # a peer that died and never returns
    streamer = CountingStreamer()
    started = time.monotonic()
    items = _stage(streamer, ["a", "b"], ctx)
    assert time.monotonic() - started >= stage_claims.LEASE_S
    assert streamer.streamed == ["a", "b"] and len(items) == 6
    assert "b: taking it over from node-1-of-2 (host elsewhere, pid 4243)" in capsys.readouterr().err
    assert not list(ctx.stage_dir.glob("*.claim-*"))


def test_a_holder_that_was_taken_over_gives_the_unit_up(tmp_path, quick):
    stage = tmp_path / "stage"
    stage.mkdir()
    streamer = CountingStreamer(delay=0.1)
    result = []
    thread = threading.Thread(target=lambda: result.append(
        staging._stage_one((streamer, "a", str(stage), False, "node-1-of-2", None))))
    thread.start()  # a slow holder claims the unit; another task then takes it over
    deadline = time.monotonic() + 5
    while not (stage / "a.claim-0").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    taker = stage_claims.claim(stage, "a", "node-0-of-2", stage_claims.current(stage, "a"))
    thread.join()
    assert taker is not None and taker.generation == 1
    assert result == [staging.BUSY]
    assert not (stage / "a.bin").exists() and not list(stage.glob(f"*{state.TMP_MARK}*"))


def test_claims_are_exclusive_across_processes(tmp_path):
    """O_EXCL claims from many processes at once: exactly one wins each generation."""
    stage = tmp_path / "stage"
    stage.mkdir()
    code = ("import sys; from pathlib import Path; from shardify import stage_claims as c; "
            "print(c.claim(Path(sys.argv[1]), 'u', sys.argv[2], None) is not None)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(stage), f"node-{r}-of-8"], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
             for r in range(8)]
    wins = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert wins.count("True") == 1 and wins.count("False") == 7
    assert stage_claims.current(stage, "u").task == f"node-{wins.index('True')}-of-8"
