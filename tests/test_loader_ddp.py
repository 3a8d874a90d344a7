"""A real two-process torchrun (gloo, CPU) over deliberately uneven shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loader_fixtures import image_shards, key_of

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.slow
def test_torchrun_two_ranks_uneven_shards_equal_batches(tmp_path):
    sizes = [13, 2, 7, 1]  # 23 samples: odd, and nothing divides evenly
    d = image_shards(str(tmp_path / "shards"), sizes)
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "loader_ddp_script.py"), d, str(out)]
    # a hang (ranks with different batch counts blocking in all_reduce) fails on the timeout
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    every = {key_of("", s, i) for s, n in enumerate(sizes) for i in range(n)}
    for remainder, expect_steps in (("drop", 23 // 6), ("pad", -(-23 // 6))):
        ranks = report[remainder]
        assert [x["steps"] for x in ranks] == [expect_steps] * 2
        assert all(x["len"] == expect_steps for x in ranks)
        keys = ranks[0]["keys"] + ranks[1]["keys"]
        assert len(keys) == len(set(keys))
        assert set(keys) == every if remainder == "pad" else len(keys) == expect_steps * 6
        assert all(x["state"]["epoch"] == 1 and x["state"]["consumed"] == 0 for x in ranks)
