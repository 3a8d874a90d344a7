"""ImageNet "zero-shot" classification of a multimodal student: class embeddings from prompts.

Each class name is put into the 80 prompt templates of CLIP's ImageNet evaluation; the
captions are tokenised to at most 22 tokens ([CLS] and [SEP] included, the length the thesis
used with the BERT tokenizer), embedded by the text tower and L2-normalised; a class's
embedding is the mean of its 80, normalised again (as CLIP and the thesis code do). Logits are
100 x the dot product of the normalised image embedding with each class embedding.

Class names: by default the CLIP/open_clip ImageNet names the thesis used (data/
imagenet_openclip_classnames.txt, source and licence in its header); `wordnet` takes the
manifest's `class_names` (shardify writes the first WordNet lemma of each synset: 297 of the
1,000 differ from CLIP's, and "crane" and "maillot" appear twice), or a file given by the user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .metrics import per_class_accuracy, topk_accuracy

MAX_TOKENS = 22
LOGIT_SCALE = 100.0

# CLIP's 80 ImageNet prompt templates (OpenAI, "Prompt Engineering for ImageNet"), in its order
TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(TEMPLATES) == 80


OPENCLIP_NAMES = Path(__file__).parent / "data" / "imagenet_openclip_classnames.txt"
CLASS_NAME_SOURCES = ("openclip", "wordnet")


def openclip_imagenet_names() -> list[str]:
    """The CLIP/open_clip ImageNet-1k names (the thesis's), label order; see the file's header."""
    text = OPENCLIP_NAMES.read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def class_names(manifest: dict, source: str | None = "openclip") -> list[str]:
    """Readable class names in label order. `source`: "openclip" (the default: the CLIP/open_clip
    ImageNet names the thesis used; needs a manifest with the 1,000 ImageNet classes), "wordnet"
    (the manifest's `class_names`, the first WordNet lemma of each synset, else its `classes`), or a
    file: one name per line, or `synset<TAB>name` lines as in shardify's imagenet_classes.tsv
    (`#` lines skipped)."""
    classes = manifest.get("classes") or []
    source = source or "openclip"
    if source == "openclip":
        names = openclip_imagenet_names()
        if len(classes) != len(names):
            raise ValueError(f"the CLIP/open_clip class names are ImageNet-1k's {len(names)}, the shards have "
                             f"{len(classes)} classes: give --class-names wordnet or a file")
        return names
    if source not in CLASS_NAME_SOURCES:
        lines = [ln.rstrip("\n") for ln in Path(source).read_text(encoding="utf-8").splitlines()]
        names = [ln.split("\t")[-1].strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        if classes and len(names) != len(classes):
            raise ValueError(f"{source} has {len(names)} names, the shards have {len(classes)} classes")
        return names
    names = manifest.get("class_names") or classes
    if not names:
        raise ValueError("the manifest lists no classes: give the class names with --class-names")
    return [str(n) for n in names]


def prompts(name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    return [t.format(name) for t in templates]


@torch.no_grad()
def class_embeddings(embed_texts: Callable[[list[str]], torch.Tensor], names: Sequence[str],
                     templates: Sequence[str] = TEMPLATES, chunk: int = 2048) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the normalised embeddings of its prompts.
    `embed_texts(list of captions)` returns [n, D] embeddings (normalised or not); it is called
    on chunks of the C x len(templates) prompts, class by class in template order."""
    everything = [p for name in names for p in prompts(name, templates)]
    emb = torch.cat([embed_texts(everything[s:s + chunk]).float() for s in range(0, len(everything), chunk)])
    emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_logits(image_ND: torch.Tensor, classes_CD: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * F.normalize(image_ND.float(), dim=-1) @ classes_CD.float().to(image_ND.device).T


def zero_shot_eval(image_ND: torch.Tensor, labels_N: torch.Tensor, classes_CD: torch.Tensor) -> dict:
    logits = zero_shot_logits(image_ND, classes_CD)
    labels = labels_N.long().to(logits.device)
    return {**topk_accuracy(logits, labels), **per_class_accuracy(logits, labels)}
