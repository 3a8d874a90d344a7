"""`trainer eval`: one subcommand per benchmark. Each parses its options, loads the model and
calls one function of trainer/eval/benchmarks.py, which writes the JSON record and prints a
one-line summary.

    trainer eval probe MODEL --train-shards DIR --val-shards DIR      fast probe + k-NN (health check)
    trainer eval retrieval MODEL --shards DIR [--split test]           image<->text Recall@k
    trainer eval zero-shot MODEL --val-shards DIR                      80-template zero-shot
    trainer eval glue MODEL --task all --data DIR                      GLUE, the thesis's per-task recipes
    trainer eval finetune MODEL --train-shards DIR [--linear]          image classification (thesis protocol)
    trainer eval retrieval-finetune MODEL --shards DIR                 retrieval after fine-tuning (thesis)

MODEL is an exported student, a checkpoint or a run directory; `probe --teacher KIND` takes a
teacher's own file instead (KIND: a family of trainer/models/registry.py, e.g. data2vec2 for a
fairseq checkpoint; `--data2vec2` is the older spelling of `--teacher data2vec2`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

# the probe's defaults, mirrored from linear_probe.ProbeConfig (a test keeps them equal) so that
# `trainer --help` imports no torch
_PROBE_DEFAULTS = {"epochs": 100, "batch_size": 1024, "lr": 1e-3, "weight_decay": 1e-4}
_MODEL_HELP = "exported student (trainer export), checkpoint or run directory"


def _common(f):
    """Options every benchmark shares."""
    for opt in reversed([
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help="JSON to write [default: <run dir>/eval/<benchmark>.json]"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--batch-size", type=int, default=128, show_default=True, help="images per forward"),
        click.option("--workers", type=int, default=2, show_default=True, help="loader worker processes"),
    ]):
        f = opt(f)
    return f


def teacher_options(f):
    """`--teacher KIND` and its deprecated alias `--data2vec2`, handed to the command as one
    `teacher` argument ("" for a student). KIND is checked against the registry when the model
    loads (the registry imports torch, which `trainer --help` must not), so a family registered
    by one line is accepted here too."""

    @functools.wraps(f)
    def command(*args, teacher, data2vec2, **kwargs):
        if data2vec2 and teacher not in (None, "data2vec2"):
            raise click.UsageError(f"--data2vec2 means --teacher data2vec2, not --teacher {teacher}")
        return f(*args, teacher=teacher or ("data2vec2" if data2vec2 else ""), **kwargs)

    command = click.option("--data2vec2", is_flag=True, help="deprecated: the same as --teacher data2vec2")(command)
    return click.option("--teacher", default=None, metavar="KIND",
                        help="MODEL is a teacher's own file of this family (data2vec2: a fairseq checkpoint; "
                             "beitv2: the original BEiTv2 layout) instead of a student")(command)


class _EvalGroup(click.Group):
    """The benchmark commands, plus `glue`, imported only when asked for (trainer/eval/glue.py
    brings the text fine-tuning stack); without that module `glue` says so in one line."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "glue"})

    def get_command(self, ctx, name):
        if name == "glue" and name not in self.commands:
            return _glue_command()
        return super().get_command(ctx, name)


def _glue_command() -> click.Command:
    try:
        from .glue import glue_command
    except ImportError as e:
        missing = f"{type(e).__name__}: {e}"

        @click.command("glue", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        def glue_missing() -> None:
            """GLUE fine-tuning of a text student (not available in this installation)."""
            from trainer.errors import UserError

            raise UserError(f"GLUE evaluation is not available in this installation ({missing})")

        return glue_missing
    return glue_command


@click.group("eval", cls=_EvalGroup)
def eval_group() -> None:
    """Evaluate a student (or its teacher) on the thesis's benchmarks; writes one JSON per run."""


@eval_group.command("probe")
@click.argument("model", type=click.Path(exists=True))
@click.option("--train-shards", required=True, help="shard directory (or manifest.json) of the probe's training images")
@click.option("--val-shards", default=None, help="shard directory of the validation images [default: --train-shards]")
@click.option("--train-split", default="train", show_default=True)
@click.option("--val-split", default="validation", show_default=True)
@click.option("--pool", type=click.Choice(["cls", "mean"]), default="mean", show_default=True,
              help="image feature: [CLS] or the mean of the patch tokens")
@teacher_options
@click.option("--image-size", type=int, default=None, help="override the model's image size")
@click.option("--label", default="", help="name shown in the summary and the report (e.g. teacher)")
@click.option("--epochs", type=int, default=_PROBE_DEFAULTS["epochs"], show_default=True, help="probe training epochs")
@click.option("--lr", type=float, default=_PROBE_DEFAULTS["lr"], show_default=True, help="probe peak learning rate")
@click.option("--weight-decay", type=float, default=_PROBE_DEFAULTS["weight_decay"], show_default=True)
@click.option("--probe-batch-size", type=int, default=_PROBE_DEFAULTS["batch_size"], show_default=True)
@click.option("--knn-k", type=int, default=20, show_default=True, help="neighbours of the k-NN classifier")
@click.option("--knn-temperature", type=float, default=0.07, show_default=True, help="vote weight exp(sim / T)")
@click.option("--cache-dir", default=None, help="feature cache [default: features/ beside --out]; '' disables it")
@_common
def probe_cmd(model, train_shards, val_shards, train_split, val_split, pool, teacher, image_size, label, epochs,
              lr, weight_decay, probe_batch_size, knn_k, knn_temperature, cache_dir, out, device, batch_size,
              workers) -> None:
    """Fast probe: a LayerNorm + linear head on cached frozen features, and k-NN accuracy of MODEL's
    image encoder (a quick health check; the thesis's linear probe is `finetune --linear`)."""
    from .benchmarks import run_probe
    from .linear_probe import ProbeConfig
    from .models import load_eval_model

    m = load_eval_model(model, teacher=teacher, image_size=image_size)
    cfg = ProbeConfig(epochs=epochs, batch_size=probe_batch_size, lr=lr, weight_decay=weight_decay)
    run_probe(m, model, train_shards, val_shards or train_shards, train_split, val_split, pool, cfg, knn_k,
              knn_temperature, batch_size, workers, device, cache_dir, out,
              label=label or ("teacher" if teacher else ""))


@eval_group.command("retrieval")
@click.argument("model", type=click.Path(exists=True))
@click.option("--shards", required=True, help="image-text pair shards (COCO 5k / Flickr30k 1k Karpathy test)")
@click.option("--split", default="test", show_default=True)
@click.option("--name", default="", help="benchmark name in the record [default: the manifest's dataset]")
@click.option("--tokenizer", default=None, help="tokenizer.json or vocab.txt [default: the model's]")
@click.option("--max-len", type=int, default=None, help="caption length in tokens [default: the model's]")
@_common
def retrieval_cmd(model, shards, split, name, tokenizer, max_len, out, device, batch_size, workers) -> None:
    """Image-text retrieval Recall@1/5/10 in both directions (multimodal students)."""
    from .benchmarks import run_retrieval
    from .models import load_eval_model

    run_retrieval(load_eval_model(model), model, shards, split, tokenizer, max_len, batch_size, workers, device,
                  out, name)


@eval_group.command("zero-shot")
@click.argument("model", type=click.Path(exists=True))
@click.option("--val-shards", required=True, help="ImageNet validation shards")
@click.option("--val-split", default="validation", show_default=True)
@click.option("--class-names", default="openclip", show_default=True,
              help="openclip (the CLIP/open_clip ImageNet names the thesis used), wordnet (the manifest's "
                   "first WordNet lemmas), or a file: one name per line or synset<TAB>name")
@click.option("--max-tokens", type=int, default=22, show_default=True, help="prompt length in tokens")
@click.option("--tokenizer", default=None, help="tokenizer.json or vocab.txt [default: the model's]")
@click.option("--present-classes-only", is_flag=True,
              help="name only the classes that have validation images (small demo sets; not the benchmark)")
@click.option("--cache-dir", default=None, help="feature cache [default: features/ beside --out]; '' disables it")
@_common
def zero_shot_cmd(model, val_shards, val_split, class_names, max_tokens, tokenizer, present_classes_only, cache_dir,
                  out, device, batch_size, workers) -> None:
    """ImageNet zero-shot top-1/top-5 with the 80 CLIP prompt templates (multimodal students)."""
    from .benchmarks import run_zero_shot
    from .zero_shot import CLASS_NAME_SOURCES

    if class_names not in CLASS_NAME_SOURCES and not Path(class_names).is_file():
        raise click.BadParameter(f"not openclip, wordnet or a file: {class_names}", param_hint="--class-names")
    from .models import load_eval_model

    run_zero_shot(load_eval_model(model), model, val_shards, val_split, class_names, max_tokens, tokenizer,
                  batch_size, workers, device, cache_dir, out, present_only=present_classes_only)


@eval_group.command("finetune")
@click.argument("model", type=click.Path(exists=True))
@click.option("--train-shards", required=True, help="image-classification shards to train on (ImageNet, CIFAR, ...)")
@click.option("--val-shards", default=None, help="shards of the held-out images [default: --train-shards]")
@click.option("--train-split", default="train", show_default=True)
@click.option("--val-split", default="validation", show_default=True, help="CIFAR: test")
@click.option("--linear", is_flag=True, help="linear probe: freeze the encoder, train LayerNorm + head only")
@teacher_options
@click.option("--epochs", type=float, default=None, help="[default: the thesis's 15]")
@click.option("--batch-size", type=int, default=None, help="[default: the thesis's 256]")
@click.option("--lr", type=float, default=None, help="peak learning rate [default: the thesis's 1e-3]")
@click.option("--layer-decay", type=float, default=None, help="[default: 0.75 on CIFAR, 0.81 otherwise]")
@click.option("--image-size", type=int, default=None, help="[default: the thesis's 224]")
@click.option("--seed", type=int, default=None, help="[default: 42]")
@click.option("--max-train-samples", type=int, default=0, show_default=True, help="0: all (quick checks)")
@click.option("--max-eval-samples", type=int, default=0, show_default=True, help="0: all")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON to write [default: <run dir>/eval/<finetune|linear>_<dataset>.json]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="loader worker processes")
def finetune_cmd(model, train_shards, val_shards, train_split, val_split, linear, teacher, epochs, batch_size, lr,
                 layer_decay, image_size, seed, max_train_samples, max_eval_samples, out, device, workers) -> None:
    """Image classification as the thesis measured it: full fine-tuning (or, with --linear, the linear
    probe) of MODEL's image encoder with timm's RandAugment, Mixup/CutMix, random erasing and layer decay."""
    from .finetune import FinetuneOptions, run_finetune
    from .models import load_eval_model

    opts = FinetuneOptions(linear=linear, epochs=epochs, batch_size=batch_size, lr=lr, layer_decay=layer_decay,
                           image_size=image_size, seed=seed, max_train_samples=max_train_samples,
                           max_eval_samples=max_eval_samples)
    run_finetune(load_eval_model(model, teacher=teacher), model, train_shards, val_shards or train_shards,
                 train_split, val_split, opts, workers, device, out)


@eval_group.command("retrieval-finetune")
@click.argument("model", type=click.Path(exists=True))
@click.option("--shards", required=True, help="image-text pair shards with a train and a test split (COCO / Flickr30k)")
@click.option("--train-split", default="train", show_default=True)
@click.option("--split", "test_split", default="test", show_default=True, help="the split scored after training")
@click.option("--tokenizer", default=None, help="tokenizer.json or vocab.txt [default: the model's]")
@click.option("--epochs", type=float, default=None, help="[default: the thesis's 20]")
@click.option("--batch-size", type=int, default=None, help="[default: the thesis's 1024]")
@click.option("--lr", type=float, default=None, help="peak learning rate [default: the thesis's 3e-5]")
@click.option("--seed", type=int, default=None, help="[default: 42]")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON to write [default: <run dir>/eval/retrieval_finetune_<dataset>.json]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="loader worker processes")
def retrieval_finetune_cmd(model, shards, train_split, test_split, tokenizer, epochs, batch_size, lr, seed, out,
                           device, workers) -> None:
    """Fine-tune a multimodal MODEL on a retrieval data set's train split with the contrastive loss (the
    thesis's recipe), then score image<->text Recall@1/5/10 on its test split."""
    from .models import load_eval_model
    from .retrieval_finetune import RetrievalFinetuneOptions, run_retrieval_finetune

    opts = RetrievalFinetuneOptions(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    run_retrieval_finetune(load_eval_model(model), model, shards, train_split, test_split, opts, workers, device,
                           out, tokenizer)
