"""Index files for the readers users already have, written next to the shards by finalize.

- `_info.json` for timm's webdataset reader (`timm.data.create_dataset("wds/...")`): per split
  its name, num_samples, filenames and shard_lengths (timm reads it from the dataset root).
- `wids-{split}.json` for wids (`wids.ShardListDataset(path)`): a shard index of kind
  `wids-shard-index-v1` with each shard's url (relative to the index), nsamples and filesize.
- `sizes.json` (open_clip's convention) is written by finalize from the same numbers.
All are derived from the manifest only, so they are byte-identical on every rerun.
"""

from __future__ import annotations


def wids_index_name(split: str) -> str:
    return f"wids-{split}.json"


def reader_index_names(split: str) -> str:
    """The per-split index files finalize writes (today the wids index)."""
    return wids_index_name(split)


def timm_info(manifest: dict) -> dict:
    return {
        "name": manifest["dataset"],
        "splits": {
            split: {
                "name": split,
                "num_samples": info["samples"],
                "filenames": [sh["name"] for sh in info["shards"]],
                "shard_lengths": [sh["samples"] for sh in info["shards"]],
            }
            for split, info in manifest["splits"].items()
        },
    }


def wids_index(manifest: dict, split: str) -> dict:
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": f"{manifest['dataset']}-{split}",
        "shardlist": [{"url": sh["name"], "nsamples": sh["samples"], "filesize": sh["bytes"]}
                      for sh in manifest["splits"][split]["shards"]],
    }
