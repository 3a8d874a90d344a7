"""Run by test_loader_ddp.py under torchrun (gloo, CPU): every rank iterates the loader and
all-reduces once per batch, as DDP does per step; uneven batch counts would hang here."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from trainer.data import AugmentConfig, DataConfig, build_loader


def main(manifest: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for remainder in ("drop", "pad"):
        cfg = DataConfig(manifests=[manifest], batch_size=3, num_workers=1, shuffle_buffer=5, seed=1,
                         remainder=remainder, augment=AugmentConfig(size=16))
        ld = build_loader(cfg, rank, world, torch.device("cpu"), "image")
        keys, steps = [], 0
        for batch in ld:
            t = torch.ones(1)
            dist.all_reduce(t)  # a collective per step, like DDP's gradient all-reduce
            assert int(t.item()) == world
            keys += [k for k, p in zip(batch["key"], batch["is_pad"].tolist()) if not p]
            steps += 1
        gathered = [None] * world
        dist.all_gather_object(gathered, {"steps": steps, "len": len(ld), "keys": keys, "state": ld.state_dict()})
        report[remainder] = gathered
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
