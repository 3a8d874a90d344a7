"""`shardify openwebtext`: OpenWebText slices to text shards (documents or packed token blocks).

    shardify openwebtext --out shards/owt --split train --slices 0-4
    shardify openwebtext --out shards/owt --split validation --slices 5
    shardify openwebtext --out shards/owt-tok --split train --tokenizer bert-base-uncased --block-size 256
    shardify openwebtext ... --tokenizer bert-base-uncased --packing stream   # contiguous blocks
"""

from __future__ import annotations

import click

from shardify.cli.common import execute, job_options


def openwebtext_source(source_dir, revision, split_slices, clean, tokenizer, block_size, packing="stream"):
    """Build the source: local copy (either layout) or the hub repo at a resolved revision."""
    from shardify.sources.openwebtext import HUB_ID, OpenWebTextSource
    from shardify.storage import hub_location, local_location
    from shardify.tokenization import resolve_tokenizer

    spec = resolve_tokenizer(tokenizer) if tokenizer else None
    location = local_location(source_dir, repo_id=None) if source_dir else hub_location(HUB_ID, revision)
    return OpenWebTextSource(location, split_slices, clean=clean, tokenizer=spec, block_size=block_size,
                             packing=packing)


def slice_mapping(splits: list[str], slices: str | None, split_slices: tuple[str, ...]) -> dict:
    """The split -> slices mapping from the options (see --help)."""
    from shardify.format import ShardifyError
    from shardify.sources.openwebtext import DEFAULT_SLICES, parse_slices

    mapping = {k: list(v) for k, v in DEFAULT_SLICES.items()}
    if split_slices:
        mapping = {}
        for spec in split_slices:
            name, sep, rng = spec.partition("=")
            if not sep or not name:
                raise ShardifyError(f"--split-slices {spec!r}: use SPLIT=RANGE, e.g. train=0-4")
            mapping[name] = parse_slices(rng)
    if slices is not None:
        if len(splits) != 1:
            raise ShardifyError("--slices applies to one --split; use --split-slices for several")
        chosen = parse_slices(slices)
        if not split_slices:
            # The range given wins over the other splits' defaults (train 0-5 leaves
            # validation nothing of its default 5, so it is dropped).
            for other in list(mapping):
                mapping[other] = [x for x in mapping[other] if x not in chosen]
                if not mapping[other]:
                    del mapping[other]
        mapping[splits[0]] = chosen
    for s in splits:
        if s not in mapping:
            raise ShardifyError(f"no slices for split {s!r}: pass --slices RANGE or --split-slices {s}=RANGE")
    return mapping


@click.command("openwebtext")
@job_options
@click.option("--split", "splits", multiple=True,
              help="Split to write (repeatable). Default: train.")
@click.option("--slices", default=None,
              help="Slices of --split, e.g. 0-4 or 5 or 0-2,7. Defaults: train 0-4, validation 5.")
@click.option("--split-slices", multiple=True,
              help="Whole mapping, repeatable: --split-slices train=0-5 --split-slices validation=6. "
                   "Jobs into one --out must use the same mapping.")
@click.option("--no-clean", is_flag=True, help="Write documents as decoded, without the reference cleaning.")
@click.option("--tokenizer", default=None,
              help="Pre-tokenise with this fast tokenizer (tokenizer.json, vocab.txt, a directory, or a hub "
                   "model id) and pack documents into blocks; samples become npy blocks.")
@click.option("--block-size", default=256, show_default=True, type=click.IntRange(min=3),
              help="Ids per block including [CLS] and [SEP].")
@click.option("--packing", type=click.Choice(["lines", "stream"]), default="lines", show_default=True,
              help="With --tokenizer: 'lines' packs whole cleaned lines greedily into each block and pads the "
                   "rest (the thesis's data); 'stream' cuts the concatenated documents into full blocks.")
def openwebtext(out, job, max_reject_rate, source_dir, revision, splits, slices, split_slices, no_clean,
                tokenizer, block_size, packing):
    """OpenWebText (Skylion007/openwebtext) to shards: txt + json per document, or npy token blocks."""
    chosen = list(splits) or ["train"]
    mapping = slice_mapping(chosen, slices, split_slices)
    source = openwebtext_source(source_dir, revision, mapping, not no_clean, tokenizer, block_size, packing)
    manifest = execute(source, out, chosen, job, max_reject_rate)
    for split, info in (manifest or {}).get("splits", {}).items():
        if "tokens" in info:
            t = info["tokens"]
            click.echo(f"{split}: {t['tokens']} tokens from {t['documents']} documents in {t['blocks']} blocks "
                       f"of {block_size} ({t.get('packing', 'stream')} packing, "
                       f"{100 * t.get('padding_share', 0):.1f}% padding)")
