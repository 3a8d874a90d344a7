"""Order, splitting and resume properties of the streaming loader (text-id fixtures: fast)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

try:  # the test extra: without it the property test below skips (with the reason), the rest runs
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

from loader_fixtures import id_shards, key_of
from trainer.data import DataConfig, build_loader
from trainer.data.order import EpochPlan, load_source
from trainer.data.stream import BatchStream

SIZES = [7, 3, 11, 1, 6]  # deliberately uneven; 28 samples
ALL = {key_of("", s, i) for s, n in enumerate(SIZES) for i in range(n)}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return id_shards(str(tmp_path_factory.mktemp("ids")), SIZES)


def cfg_for(d, **kw) -> DataConfig:
    base = dict(manifests=[d], batch_size=4, num_workers=0, shuffle_buffer=5, seed=7, block_size=4)
    base.update(kw)
    return DataConfig(**base)


def simulated_rank(cfg, sources, W, rank, nw, epoch=0, start=0):
    """One rank's batches with nw workers simulated in-process, interleaved like DataLoader."""
    streams = []
    for j in range(max(nw, 1)):
        bs = BatchStream(sources, cfg, "text", rank, W, epoch, start, gpu_decode=False)
        bs.worker_override = (j, max(nw, 1))
        streams.append(iter(bs))
    out, s = [], 0
    while True:
        b = next(streams[s % len(streams)], None)
        if b is None:
            break
        assert b["step"] == s
        out.append(b)
        s += 1
    return out


def check_ids_match_keys(b):
    for key, ids in zip(b["key"], b["input_ids"].tolist()):
        assert key == key_of("", ids[0] - 1000, ids[1])


@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("nw", [0, 1, 3])
@pytest.mark.parametrize("W", [1, 2, 3])
def test_epoch_split_over_ranks_and_workers(shards, W, nw, remainder):
    cfg = cfg_for(shards, remainder=remainder)
    sources = [load_source(shards, "train")]
    # reference order: one rank, batch 1, no workers, padded: every position once
    ref = [b["key"][0] for b in simulated_rank(cfg_for(shards, batch_size=1, remainder="pad"), sources, 1, 0, 0)]
    assert sorted(ref) == sorted(ALL)
    ranks = [simulated_rank(cfg, sources, W, r, nw) for r in range(W)]
    steps = {len(r) for r in ranks}
    assert len(steps) == 1, "ranks got different batch counts"
    n_steps = steps.pop()
    gb = cfg.batch_size * W
    assert n_steps == (len(ALL) // gb if remainder == "drop" else -(-len(ALL) // gb))
    seen, pads = [], []
    for s in range(n_steps):
        for r in range(W):
            b = ranks[r][s]
            check_ids_match_keys(b)
            seen += b["key"]
            pads += b["is_pad"].tolist()
    # the global sequence is the reference order, whatever W and the worker count
    real = [k for k, p in zip(seen, pads) if not p]
    assert real == ref[: len(real)]
    if remainder == "pad":
        assert sorted(real) == sorted(ALL)
        assert sum(pads) == n_steps * gb - len(ALL)
        assert all(pads[len(ALL):]) and not any(pads[: len(ALL)])
        assert seen[len(ALL):] == [ref[p % len(ALL)] for p in range(len(ALL), n_steps * gb)]
    else:
        assert not any(pads) and len(set(real)) == len(real) == n_steps * gb


def test_order_is_a_pure_function_of_seed_and_epoch(shards):
    sources = [load_source(shards, "train")]
    def order(seed, epoch, buf=5):
        cfg = cfg_for(shards, batch_size=1, seed=seed, shuffle_buffer=buf, remainder="pad")
        return [b["key"][0] for b in simulated_rank(cfg, sources, 1, 0, 0, epoch=epoch)]
    a = order(7, 0)
    assert a == order(7, 0)
    assert a != order(7, 1) and a != order(8, 0)
    assert sorted(order(7, 3)) == sorted(ALL)
    # without shuffling: manifest order, tar order; buffer 1: whole shards in a seeded order
    assert order(7, 0, buf=0) == [key_of("", s, i) for s, n in enumerate(SIZES) for i in range(n)]
    runs = order(7, 0, buf=1)
    shard_seq = [k[:4] for k in runs]
    assert [k for k in runs] == sorted(runs, key=lambda k: (shard_seq.index(k[:4]), k))
    assert len({k[:4] for k in runs}) == len(SIZES) and runs != order(7, 0, buf=0)
    # the shuffle is bounded: a window of K samples holds whole runs of shards read in order
    plan = EpochPlan(sources, [], 7, 0, 5)
    for w in range(plan.num_windows):
        a_, b_ = plan.window_range(w)
        r = plan.lookup(np.arange(a_, b_))
        read = sorted(zip(plan._window_perm(w).tolist(), r["shard"].tolist(), r["index"].tolist()))
        for (_, s0, i0), (_, s1, i1) in zip(read, read[1:]):
            assert s1 != s0 or i1 == i0 + 1  # within a shard, consecutive samples


def run_loaders(cfg, W, state=None, max_steps=None):
    loaders = [build_loader(cfg, r, W, CPU, "text") for r in range(W)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    assert len({len(ld) for ld in loaders}) == 1
    its = [iter(ld) for ld in loaders]
    keys, pads, steps = [], [], 0
    while max_steps is None or steps < max_steps:
        bs = [next(it, None) for it in its]
        if bs[0] is None:
            assert all(b is None for b in bs), "ranks ended at different steps"
            break
        for b in bs:
            keys += b["key"]
            pads += b["is_pad"].tolist()
        steps += 1
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)
    return keys, pads, states[0], steps


def _resume_property(fn):
    if given is None:
        return pytest.mark.skip(reason="needs the test extra (hypothesis)")(fn)
    fn = given(B=st.integers(1, 5), buf=st.sampled_from([0, 1, 4, 9, 100]), W1=st.integers(1, 3),
               W2=st.integers(1, 3), k=st.integers(0, 9), remainder=st.sampled_from(["drop", "pad"]),
               epoch=st.integers(0, 2))(fn)
    return settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])(fn)


@_resume_property
def test_resume_on_another_world_size_repeats_and_skips_nothing(shards, B, buf, W1, W2, k, remainder, epoch):
    cfg = cfg_for(shards, batch_size=B, shuffle_buffer=buf, remainder=remainder)
    full_cfg = cfg_for(shards, batch_size=1, shuffle_buffer=buf, remainder="pad")
    ref_loader = build_loader(full_cfg, 0, 1, CPU, "text")
    ref_loader.set_epoch(epoch)
    ref = [b["key"][0] for b in ref_loader]
    # first run: W1 ranks stop after k steps; the state is a few ints
    start = {"version": 1, "epoch": epoch, "consumed": 0, "seed": 7, "samples_per_epoch": len(ALL)}
    k1, p1, state, done = run_loaders(cfg, W1, start, max_steps=k)
    assert set(state) == {"version", "epoch", "consumed", "seed", "samples_per_epoch"}
    assert all(isinstance(v, int) for v in state.values())
    # second run: W2 ranks resume and finish the epoch (unless the first run already did)
    if state["epoch"] == epoch:
        k2, p2, end_state, _ = run_loaders(cfg, W2, state)
    else:
        k2, p2, end_state = [], [], state
    assert end_state["epoch"] == epoch + 1 and end_state["consumed"] == 0
    real = [x for x, p in zip(k1 + k2, p1 + p2) if not p]
    assert real == ref[: len(real)], "resume changed the order"
    assert len(set(real)) == len(real), "a sample was repeated"
    if remainder == "pad":
        assert len(real) == len(ALL), "a sample was skipped"
    else:
        if state["epoch"] == epoch:
            c = state["consumed"]
            assert len(real) == c + (len(ALL) - c) // (B * W2) * B * W2
        else:
            assert len(real) == len(ALL) // (B * W1) * B * W1


def test_set_epoch_and_len(shards):
    cfg = cfg_for(shards, batch_size=3, remainder="drop")
    ld = build_loader(cfg, 1, 2, CPU, "text")
    assert len(ld) == 28 // 6
    assert len(build_loader(cfg_for(shards, batch_size=3, remainder="pad"), 1, 2, CPU, "text")) == 5
    it = iter(ld)
    next(it)
    assert ld.state_dict()["consumed"] == 6
    ld.set_epoch(0)  # the current epoch: keeps the position
    assert ld.state_dict()["consumed"] == 6 and ld.batches_left() == 3
    ld.set_epoch(4)
    assert ld.state_dict()["epoch"] == 4 and ld.state_dict()["consumed"] == 0
    assert sum(1 for _ in ld) == 4 and ld.state_dict()["epoch"] == 5


def test_state_from_another_dataset_or_seed_is_refused(shards):
    ld = build_loader(cfg_for(shards), 0, 1, CPU, "text")
    sd = ld.state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg_for(shards, seed=8), 0, 1, CPU, "text").load_state_dict(sd)
    with pytest.raises(ValueError, match="samples per epoch"):
        ld.load_state_dict({**sd, "samples_per_epoch": 29})


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_real_dataloader_workers_match_the_simulation(shards):
    cfg = cfg_for(shards, batch_size=2, num_workers=3, remainder="pad")
    sources = [load_source(shards, "train")]
    for rank in range(2):
        got = [b["key"] for b in build_loader(cfg, rank, 2, CPU, "text")]
        want = [b["key"] for b in simulated_rank(cfg, sources, 2, rank, 0)]
        assert got == want


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_with_real_workers_across_worker_counts(shards):
    cfg3 = cfg_for(shards, batch_size=3, num_workers=3, remainder="pad")
    ld = build_loader(cfg3, 0, 1, CPU, "text")
    first = []
    for n, b in enumerate(ld):
        first += b["key"]
        if n == 3:
            break
    sd = ld.state_dict()
    assert sd["consumed"] == 12
    ld1 = build_loader(cfg_for(shards, batch_size=3, num_workers=1, remainder="pad"), 0, 1, CPU, "text")
    ld1.load_state_dict(sd)
    rest = [(k, p) for b in ld1 for k, p in zip(b["key"], b["is_pad"].tolist())]
    real = first + [k for k, p in rest if not p]
    assert sorted(real) == sorted(ALL)


def test_mixing_weights(tmp_path):
    a = id_shards(str(tmp_path / "a"), [5, 7], prefix="a")  # 12 samples
    b = id_shards(str(tmp_path / "b"), [20, 16], prefix="b")  # 36 samples
    sources = [load_source(a, "train"), load_source(b, "train")]
    # no weights: each source exactly once per epoch, interleaved in proportion in every window
    plan = EpochPlan(sources, [], 1, 0, 8)
    assert plan.n.tolist() == [12, 36]
    per_window = np.diff(plan.alloc, axis=0)
    assert (per_window[:, 0] >= 1).all() and (per_window[:, 0] <= 3).all()
    # weights 1:1 over 48 samples per epoch: 24 from each; source a wraps, covering all of its
    # samples before any repeats; b is walked through over one and a half epochs
    cfg = DataConfig(manifests=[a, b], weights=[1, 1], batch_size=4, num_workers=0, shuffle_buffer=6, seed=3)
    ld = build_loader(cfg, 0, 1, CPU, "text")
    epochs = [[k for bt in ld for k in bt["key"]] for _ in range(3)]
    for ep in epochs:
        c = collections.Counter(k[0] for k in ep)
        assert c["a"] == 24 and c["b"] == 24
    a_stream = [k for ep in epochs for k in ep if k[0] == "a"]
    for i in range(0, 72, 12):
        assert len(set(a_stream[i:i + 12])) == 12
    b_stream = [k for ep in epochs for k in ep if k[0] == "b"]
    assert len(set(b_stream[:36])) == 36
    with pytest.raises(ValueError, match="weights"):
        build_loader(DataConfig(manifests=[a, b], weights=[1.0]), 0, 1, CPU, "text")


@pytest.mark.parametrize("weights", [[], [2, 1]])
def test_mixed_sources_resume_across_world_sizes(tmp_path, weights):
    a = id_shards(str(tmp_path / "a"), [5, 7], prefix="a")
    b = id_shards(str(tmp_path / "b"), [9, 2, 6], prefix="b")
    def cfg(B, remainder):
        return DataConfig(manifests=[a, b], weights=weights, batch_size=B, num_workers=0, shuffle_buffer=7,
                          seed=11, remainder=remainder, block_size=4)
    ref_loader = build_loader(cfg(1, "pad"), 0, 1, CPU, "text")
    ref_loader.set_epoch(1)
    ref = [x["key"][0] for x in ref_loader]
    assert len(ref) == 29
    state = {"version": 1, "epoch": 1, "consumed": 0, "seed": 11, "samples_per_epoch": 29}
    k1, p1, state, _ = run_loaders(cfg(2, "pad"), 2, state, max_steps=3)
    assert state["consumed"] == 12
    k2, p2, _, _ = run_loaders(cfg(2, "pad"), 3, state)
    real = [x for x, p in zip(k1 + k2, p1 + p2) if not p]
    assert real == ref
    if not weights:
        assert len(set(real)) == 29
