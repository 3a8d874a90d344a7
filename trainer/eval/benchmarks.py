"""One function per benchmark: model + shards -> metrics, a JSON record and a one-line summary.

These glue models.py, features.py, the metric modules and results.py; the CLI only parses
options and calls them. Each returns the record it wrote.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trainer.data.text import TextEncoder
from trainer.errors import UserError
from trainer.preflight import check_kind

from .features import FeatureCache, eval_data_config, extract_image_features, extract_pair_embeddings, read_manifest
from .knn import knn_eval
from .linear_probe import ProbeConfig, probe_eval
from .models import EvalModel
from .results import manifest_record, protocol_name, write_result
from .retrieval import retrieval_metrics
from .zero_shot import CLASS_NAME_SOURCES, TEMPLATES, class_embeddings, class_names, zero_shot_eval


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    return torch.device(name)


def _manifest(shards: str, split: str) -> dict:
    """The manifest, checked to hold `split` before anything is read or written."""
    try:
        doc = read_manifest(shards)[0]
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    splits = doc.get("splits") or {}
    if split not in splits:
        raise UserError(f"split {split!r} not in manifest {shards} (has: {', '.join(sorted(splits)) or 'none'})")
    return doc


def _image_features(model: EvalModel, shards: str, split: str, cache: FeatureCache, batch_size: int,
                    workers: int, device: torch.device, what: str) -> dict:
    encoder = model.encoder("image", "the probe and zero-shot")
    cfg = eval_data_config(shards, split, model.augment, batch_size, workers)
    facts = {"model_sha256": model.sha256, "encoder": "image", "manifest_sha256": read_manifest(shards)[1],
             "split": split, "augment": asdict(cfg.augment)}
    try:
        entry, cached = cache.get_or_compute(facts, lambda: extract_image_features(encoder, cfg, device, what))
    except (FileNotFoundError, ValueError) as e:  # the loader's checks of paths, splits and options
        raise UserError(f"{what}: {e}") from None
    print(f"{what}: {len(entry['labels'])} images{' (cached)' if cached else ''}")
    return entry


def _num_classes(manifest: dict, *label_sets: torch.Tensor) -> int:
    if any((t < 0).any() for t in label_sets):
        raise UserError("some images have no label (cls missing or negative): a split without labels "
                        "cannot be evaluated")
    top = max((int(t.max()) + 1 for t in label_sets if t.numel()), default=0)
    return max(len(manifest.get("classes") or []), top)


def topk_chance(classes: int, ks=(1, 5)) -> dict[str, float]:
    """What a uniform random guess scores: top-k = k / classes (in %)."""
    return {f"top{k}": min(100.0, 100.0 * k / classes) if classes else 0.0 for k in ks}


def _write(out: Path, benchmark: str, dataset: str, metrics: dict, model: EvalModel, data: dict, options: dict,
           t0: float, protocol: str) -> dict:
    return write_result(out, benchmark, dataset, metrics, model.describe(), model.config, data, options,
                        time.perf_counter() - t0, protocol)


def _default_out(model_path: str, name: str) -> Path:
    p = Path(model_path)
    if p.is_dir():
        return p / "eval" / f"{name}.json"
    return p.parent / "eval" / f"{p.stem}-{name}.json"


def run_probe(model: EvalModel, model_path: str, train_shards: str, val_shards: str, train_split: str,
              val_split: str, pool: str, probe_cfg: ProbeConfig, knn_k: int, knn_t: float,
              batch_size: int, workers: int, device: str, cache_dir: str | None, out: str | None,
              label: str = "") -> dict:
    """Linear probe and k-NN on frozen image features of the train and validation splits."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    out_path = Path(out) if out else _default_out(model_path, "probe")
    cache = FeatureCache(cache_dir if cache_dir is not None else out_path.parent / "features")
    manifest = _manifest(train_shards, train_split)
    val_manifest = _manifest(val_shards, val_split)
    for doc, shards in ((manifest, train_shards), (val_manifest, val_shards)):  # labelled images only
        check_kind(doc, shards, "image", "the linear probe", extra=("cls",))
    train = _image_features(model, train_shards, train_split, cache, batch_size, workers, dev,
                            f"{train_split} features")
    val = _image_features(model, val_shards, val_split, cache, batch_size, workers, dev, f"{val_split} features")
    C = _num_classes(manifest, train["labels"], val["labels"])
    probe = probe_eval(train[pool], train["labels"], val[pool], val["labels"], C, probe_cfg, dev)
    knn = knn_eval(train[pool], train["labels"], val[pool], val["labels"], C, knn_k, knn_t, device=dev)
    # a probe or k-NN can only answer classes it was trained on: chance counts those
    chance = topk_chance(probe["classes_with_samples"])
    metrics = {"top1": probe["top1"], "top5": probe["top5"], "linear_probe": probe, "knn": knn,
               "train_images": len(train["labels"]), "val_images": len(val["labels"]), "classes": C,
               "chance": chance | {f"knn.{k}": v for k, v in chance.items()}}
    data = {"train": manifest_record(train_shards, train_split),
            "validation": manifest_record(val_shards, val_split)}
    options = {"pool": pool, "label": label, "knn_k": knn_k, "knn_temperature": knn_t,
               "augment": asdict(model.augment)}
    # the fast probe is a health check on cached features, never the thesis's linear probe
    rec = _write(out_path, "probe", manifest.get("dataset", ""), metrics, model, data, options, t0, "fast-probe")
    name = label or model.task
    print(f"fast probe [{name}, {pool}] top-1 {probe['top1']:.2f} top-5 {probe['top5']:.2f} | "
          f"k-NN (k={knn['k']}) top-1 {knn['top1']:.2f} top-5 {knn['top5']:.2f} | "
          f"{len(train['labels'])} train / {len(val['labels'])} val images in {probe['classes_with_samples']} "
          f"classes -> {out_path}")
    return rec


def _text_embedder(model: EvalModel, tokenizer: str, max_len: int, device: torch.device):
    """list of captions -> [n, D] normalised token-0 embeddings, tokenised as the loader does."""
    import torch.nn.functional as F

    text = model.encoder("text", "zero-shot").to(device).eval()
    if not tokenizer:
        raise UserError("no tokenizer: the model's config names none; pass --tokenizer")
    enc = TextEncoder(tokenizer)

    @torch.no_grad()
    def embed(captions: list[str]) -> torch.Tensor:
        # TextEncoder.encode_caption's ids, tokenised in one batch call: [CLS] + ids + [SEP]
        enc.pad_id()  # loads the tokenizer (and its special ids)
        seqs = [np.array([enc.cls] + ids[:max_len - 2] + [enc.sep], dtype=np.int64)
                for ids in enc.ids([c.strip() for c in captions])]
        ids, mask = enc.pad_batch(seqs, max_len)
        out = []
        for s in range(0, len(seqs), 256):
            t = text(torch.from_numpy(ids[s:s + 256]).to(device), torch.from_numpy(mask[s:s + 256]).to(device))
            out.append(F.normalize(t[:, 0].float(), dim=-1).cpu())
        return torch.cat(out)

    try:
        embed(["a photo."])  # loads the tokenizer now: a bad path fails before any image is read
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"tokenizer: {e}") from None
    return embed


# what the thesis's zero-shot figure used (src/callbacks/zero_shot.py): open_clip's names, every class
ZERO_SHOT_RECIPE = {"class_names": "openclip", "present_only": False, "max_tokens": 22}


def run_zero_shot(model: EvalModel, model_path: str, val_shards: str, val_split: str, names_file: str,
                  max_tokens: int, tokenizer: str | None, batch_size: int, workers: int, device: str,
                  cache_dir: str | None, out: str | None, present_only: bool = False) -> dict:
    """Zero-shot classification with the 80 prompt templates (multimodal students).
    `present_only` names only the classes that have validation images (small demo sets: the
    1,000 x 80 prompts take minutes on a CPU); the record says so."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    out_path = Path(out) if out else _default_out(model_path, "zero_shot")
    cache = FeatureCache(cache_dir if cache_dir is not None else out_path.parent / "features")
    manifest = _manifest(val_shards, val_split)
    names_file = names_file or "openclip"
    try:
        names = class_names(manifest, names_file)
        names_source = names_file if names_file in CLASS_NAME_SOURCES else f"file {names_file}"
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    embed = _text_embedder(model, tokenizer or model.tokenizer, max_tokens, dev)
    model.encoder("image", "zero-shot")
    val = _image_features(model, val_shards, val_split, cache, batch_size, workers, dev, f"{val_split} features")
    labels = val["labels"]
    _num_classes(manifest, labels)  # refuses unlabelled images
    if len(names) <= int(labels.max()):
        raise UserError(f"labels go up to {int(labels.max())}, but there are only {len(names)} class names")
    if present_only:
        present = torch.unique(labels)
        names = [names[i] for i in present.tolist()]
        labels = torch.searchsorted(present, labels)  # label -> position among the present classes
    classes = class_embeddings(embed, names, TEMPLATES)
    metrics = zero_shot_eval(val["cls"], labels, classes)
    # zero-shot scores every class name
    metrics |= {"val_images": len(val["labels"]), "classes": len(names), "templates": len(TEMPLATES),
                "chance": topk_chance(len(names))}
    options = {"max_tokens": max_tokens, "class_names": names_source, "present_only": present_only,
               "tokenizer": tokenizer or model.tokenizer, "augment": asdict(model.augment)}
    protocol = protocol_name("clip-80-templates-openclip-names", ZERO_SHOT_RECIPE,
                             {"class_names": names_source, "present_only": present_only, "max_tokens": max_tokens})
    rec = _write(out_path, "zero_shot", manifest.get("dataset", ""), metrics, model,
                 {"validation": manifest_record(val_shards, val_split)}, options, t0, protocol)
    print(f"zero-shot [{model.task}] top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} | "
          f"{len(val['labels'])} images, {len(names)} classes x {len(TEMPLATES)} templates -> {out_path}")
    return rec


def run_retrieval(model: EvalModel, model_path: str, shards: str, split: str, tokenizer: str | None,
                  max_len: int | None, batch_size: int, workers: int, device: str, out: str | None,
                  name: str = "") -> dict:
    """Image-text retrieval Recall@1/5/10 in both directions on pair shards."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    manifest = _manifest(shards, split)
    dataset = name or manifest.get("dataset", "") or Path(shards).name
    out_path = Path(out) if out else _default_out(model_path, f"retrieval_{dataset}")
    image = model.encoder("image", "retrieval")
    text = model.encoder("text", "retrieval")
    tok = tokenizer or model.tokenizer
    if not tok:
        raise UserError("no tokenizer: the model's config names none; pass --tokenizer")
    cfg = eval_data_config(shards, split, model.augment, batch_size, workers, tok, max_len or model.text_max_len)
    try:
        emb = extract_pair_embeddings(image, text, cfg, dev)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"retrieval: {e}") from None
    metrics = retrieval_metrics(emb["images"], emb["image_ids"], emb["texts"], emb["caption_image_ids"])
    options = {"tokenizer": tok, "text_max_len": cfg.text_max_len, "augment": asdict(model.augment)}
    rec = _write(out_path, "retrieval", dataset, metrics, model, {"test": manifest_record(shards, split)},
                 options, t0, "zero-shot")
    print(f"retrieval [{model.task}, {dataset} {split}] text R@1/5/10 "
          f"{metrics['i2t_R@1']:.2f}/{metrics['i2t_R@5']:.2f}/{metrics['i2t_R@10']:.2f} | image R@1/5/10 "
          f"{metrics['t2i_R@1']:.2f}/{metrics['t2i_R@5']:.2f}/{metrics['t2i_R@10']:.2f} | "
          f"{metrics['images']} images, {metrics['captions']} captions -> {out_path}")
    return rec
