"""Every evaluation metric against hand-computed cases: ties, several captions per image, a class
without validation images, weighted k-NN votes, the averaging of prompt templates."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.eval.knn import knn_eval, knn_scores
from trainer.eval.linear_probe import ProbeConfig, probe_eval, train_probe
from trainer.eval.metrics import per_class_accuracy, target_ranks, topk_accuracy
from trainer.eval.retrieval import retrieval_metrics
from trainer.eval.zero_shot import TEMPLATES, class_embeddings, class_names, zero_shot_eval, zero_shot_logits

T = torch.tensor


# -- top-k and the tie rule ----------------------------------------------------------------------

def test_topk_by_hand():
    scores = T([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],    # true 1: best -> rank 0
                [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],    # true 5: worst of 6 -> rank 5
                [0.3, 0.2, 0.1, 0.9, 0.8, 0.0]])   # true 4: second -> rank 1
    target = T([1, 5, 4])
    assert target_ranks(scores, target).tolist() == [0, 5, 1]
    acc = topk_accuracy(scores, target, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == pytest.approx(200 / 3)  # rank 5 is the sixth place: outside the top 5


def test_ties_count_against_the_model():
    # true class tied with one rival: rank 1 (not 0), whichever index the rival has
    assert target_ranks(T([[0.5, 0.5, 0.1]]), T([0])).tolist() == [1]
    assert target_ranks(T([[0.5, 0.5, 0.1]]), T([1])).tolist() == [1]
    # a constant classifier scores 0% top-1 and top-k only once k exceeds the tie
    const = torch.zeros(4, 3)
    acc = topk_accuracy(const, T([0, 1, 2, 0]), ks=(1, 2, 3))
    assert acc == {"top1": 0.0, "top2": 0.0, "top3": 100.0}


def test_per_class_accuracy_skips_a_class_without_images():
    # 3 classes; class 2 has no validation image. class 0: 1 of 2 right, class 1: 1 of 1 right
    scores = T([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])
    target = T([0, 0, 1])
    pc = per_class_accuracy(scores, target)
    assert pc["mean_per_class_top1"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert pc["classes_with_samples"] == 2 and pc["classes_without_samples"] == 1
    assert topk_accuracy(scores, target, (1,))["top1"] == pytest.approx(200 / 3)


def test_bad_shapes_and_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(3, 2), T([0, 1]))
    with pytest.raises(ValueError):
        topk_accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# -- k-NN ------------------------------------------------------------------------------------------

def test_knn_weighted_votes_by_hand():
    train = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # labels 0, 1, 1
    labels = T([0, 1, 1])
    q = T([[2.0, 0.0]])  # cosine with the three: 1, 0, 1/sqrt(2)
    s2 = knn_scores(train, labels, q, num_classes=3, k=2, temperature=1.0)
    assert s2[0].tolist() == pytest.approx([math.e, math.exp(2 ** -0.5), 0.0])
    # k=3 adds the orthogonal sample of class 1 (weight e^0 = 1): class 1 now wins the vote
    s3 = knn_scores(train, labels, q, num_classes=3, k=3, temperature=1.0)
    assert s3[0].tolist() == pytest.approx([math.e, math.exp(2 ** -0.5) + 1.0, 0.0])
    assert knn_eval(train, labels, q, T([1]), 3, k=3, temperature=1.0)["top1"] == 100.0
    assert knn_eval(train, labels, q, T([1]), 3, k=2, temperature=1.0)["top1"] == 0.0


def test_knn_temperature_sharpens_votes():
    train = T([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])  # one close sample of class 0, two farther of class 1
    labels = T([0, 1, 1])
    q = T([[1.0, 0.0]])
    warm = knn_scores(train, labels, q, 2, k=3, temperature=10.0)[0]  # weights ~ equal: 2 votes beat 1
    cold = knn_scores(train, labels, q, 2, k=3, temperature=0.07)[0]  # exp(1/.07) >> 2 exp(.6/.07)
    assert warm[1] > warm[0] and cold[0] > cold[1]
    assert cold[1].item() == pytest.approx(2 * math.exp(0.6 / 0.07), rel=1e-5)


def test_knn_tie_at_the_kth_neighbour_takes_the_lower_index():
    # the query is equally similar (0) to samples 1..4; k=2 takes sample 0 and then sample 1
    train = T([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, 1.0]])
    labels = T([0, 1, 2, 3, 4])
    s = knn_scores(train, labels, T([[1.0, 0.0]]), 5, k=2, temperature=1.0)[0]
    assert s.tolist() == pytest.approx([math.e, 1.0, 0.0, 0.0, 0.0])


def test_knn_with_fewer_training_samples_than_k():
    out = knn_eval(T([[1.0, 0.0]]), T([0]), T([[1.0, 0.1]]), T([0]), 2, k=20)
    assert out["k"] == 1 and out["top1"] == 100.0


# -- linear probe ----------------------------------------------------------------------------------

def _blobs(n_per: int, classes: int, dim: int, seed: int, shift: float = 8.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * shift
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def test_linear_probe_learns_separable_classes_and_is_reproducible():
    x, y = _blobs(20, 4, 8, seed=0)
    xv, yv = _blobs(5, 4, 8, seed=1)
    cfg = ProbeConfig(epochs=30, batch_size=16, lr=1e-2)
    # 6 classes in the head, 2 of which have no image at all (train or validation)
    out = probe_eval(x, y, xv, yv, num_classes=6, cfg=cfg)
    assert out["top1"] == 100.0 and out["train_top1"] == 100.0
    assert out["classes_without_samples"] == 2 and out["mean_per_class_top1"] == 100.0
    a, b = train_probe(x, y, 6, cfg), train_probe(x, y, 6, cfg)
    assert torch.equal(a.head.weight, b.head.weight)


def test_linear_probe_on_random_labels_stays_near_chance():
    x, _ = _blobs(40, 1, 16, seed=2)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(3))
    xv, _ = _blobs(200, 1, 16, seed=4)
    yv = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    out = probe_eval(x, y, xv, yv, 4, ProbeConfig(epochs=20, batch_size=8, lr=1e-2))
    assert out["top1"] < 45.0  # chance is 25%: no leak of validation labels


def test_cli_probe_defaults_mirror_probe_config():
    from trainer.eval.cli import _PROBE_DEFAULTS

    c = ProbeConfig()
    assert _PROBE_DEFAULTS == {"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
                               "weight_decay": c.weight_decay}


# -- retrieval -------------------------------------------------------------------------------------

def test_retrieval_several_captions_per_image_by_hand():
    images = T([[1.0, 0.0], [0.0, 1.0]])  # image ids "A", "B"
    captions = T([[0.6, 0.8],   # A's first caption: closer to B
                  [1.0, 0.0],   # A's second caption: exactly A
                  [0.8, 0.6]])  # B's caption: closer to A
    owners = ["A", "A", "B"]
    m = retrieval_metrics(images, ["A", "B"], captions, owners, ks=(1, 2, 5))
    # text->image: caption 0 ranks A second, caption 1 first, caption 2 ranks B second
    assert m["t2i_R@1"] == pytest.approx(100 / 3) and m["t2i_R@2"] == 100.0
    # image->text: A's best own caption (1.0) beats every other caption -> hit at 1 although
    # its other caption is not near; B's only caption (0.6) is beaten by A's first (0.8)
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    assert (m["images"], m["captions"]) == (2, 3)
    # random ranking: A owns 2 of 3 captions (top-1 is one of them with p 2/3), B 1 of 3
    assert m["chance"]["i2t_R@1"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert m["chance"]["i2t_R@2"] == pytest.approx(100 * (1 + (1 - 1 / 3)) / 2)  # B: C(2,2)/C(3,2) = 1/3 miss
    assert m["chance"]["t2i_R@1"] == 50.0 and m["chance"]["t2i_R@5"] == 100.0


def test_retrieval_ties_count_against_and_own_captions_do_not():
    images = T([[1.0, 0.0], [0.0, 1.0]])
    # B's caption scores exactly like A's two captions from image A's side
    captions = T([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    m = retrieval_metrics(images, [7, 8], captions, [7, 7, 8], ks=(1, 2))
    # image 7: its two own captions tie with each other (fine) and with caption of 8 (a rival):
    # rank 1 -> miss at 1, hit at 2. image 8: own caption scores 0, rivals score 0 too -> rank 2
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@2"] == 50.0
    # captions of 7: image 7 scores 1 > 0: hits; caption of 8: image 7 scores higher -> miss at 1
    assert m["t2i_R@1"] == pytest.approx(200 / 3) and m["t2i_R@2"] == 100.0


def test_retrieval_chunks_agree_and_bad_ids_are_refused():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(20, 5, generator=g), dim=1)
    owners = [i % 7 for i in range(20)]
    assert retrieval_metrics(img, list(range(7)), txt, owners, chunk=3) == \
        retrieval_metrics(img, list(range(7)), txt, owners, chunk=1000)
    with pytest.raises(ValueError, match="belong to no image"):
        retrieval_metrics(img, list(range(7)), txt, owners[:-1] + [99])
    with pytest.raises(ValueError, match="twice"):
        retrieval_metrics(img, [0, 1, 2, 3, 4, 5, 5], txt, owners)


# -- zero-shot -------------------------------------------------------------------------------------

def test_zero_shot_averages_normalised_template_embeddings():
    templates = ("a {}.", "the {}!")
    table = {"a cat.": [3.0, 0.0], "the cat!": [0.0, 1.0], "a dog.": [0.0, 5.0], "the dog!": [0.0, 2.0]}
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return T([table[t] for t in texts])

    cls = class_embeddings(embed, ["cat", "dog"], templates)
    assert seen == [["a cat.", "the cat!", "a dog.", "the dog!"]]
    assert torch.equal(class_embeddings(embed, ["cat", "dog"], templates, chunk=3), cls)  # chunking: same
    # cat: mean of [1,0] and [0,1] (normalised first, so the long [3,0] does not dominate), normalised
    assert cls[0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])
    assert cls[1].tolist() == pytest.approx([0.0, 1.0])
    img = T([[2.0, 0.0], [0.1, 1.0]])
    logits = zero_shot_logits(img, cls)
    assert logits[0].tolist() == pytest.approx([100 * 2 ** -0.5, 0.0])
    out = zero_shot_eval(img, T([0, 1]), cls)
    assert out["top1"] == 100.0 and out["top5"] == 100.0


def test_zero_shot_templates_and_class_names(tmp_path):
    assert len(TEMPLATES) == 80 and len(set(TEMPLATES)) == 80 and all("{}" in t for t in TEMPLATES)
    m = {"classes": ["n1", "n2"], "class_names": ["tench", "goldfish"]}
    assert class_names(m, "wordnet") == ["tench", "goldfish"]
    assert class_names({"classes": ["n1", "n2"]}, "wordnet") == ["n1", "n2"]
    with pytest.raises(ValueError, match="ImageNet-1k's 1000"):
        class_names(m)  # the open_clip names need the 1,000 ImageNet classes
    f = tmp_path / "names.tsv"
    f.write_text("# header\nn1\ttinca tinca\nn2\tcarassius\n")
    assert class_names(m, str(f)) == ["tinca tinca", "carassius"]
    f.write_text("one\n")
    with pytest.raises(ValueError, match="1 names"):
        class_names(m, str(f))


def test_linear_probe_sees_small_variation_on_a_large_offset():
    # the [CLS] of a post-LN block: a large constant vector, classes differ by 1% of it
    x, y = _blobs(20, 3, 8, seed=0)
    xv, yv = _blobs(5, 3, 8, seed=1)
    offset = torch.randn(8, generator=torch.Generator().manual_seed(9)) * 100
    out = probe_eval(offset + 0.01 * x, y, offset + 0.01 * xv, yv, 3, ProbeConfig(epochs=10, batch_size=60))
    assert out["top1"] == 100.0  # without the standardisation: chance (the LayerNorm sees the offset)


def test_thesis_figures_need_benchmark_dataset_split_and_protocol():
    from trainer.eval.results import EVALUATIONS, thesis_figure

    assert thesis_figure("linear", "imagenet", "validation", "thesis-linear")["metrics"]["top1"] == 71.1
    assert thesis_figure("finetune", "cifar100", "test", "thesis-finetune")["metrics"]["top1"] == 87.2
    assert thesis_figure("linear", "imagenet", "validation", "custom (thesis-linear with lr changed)") is None
    # the fast probe on cached features is a health check: never beside the thesis's 71.1
    assert thesis_figure("probe", "imagenet", "validation", "fast-probe") is None and not EVALUATIONS["probe"].thesis
    assert thesis_figure("retrieval", "coco-karpathy", "test", "zero-shot")["metrics"]["i2t_R@1"] == 53.54
    assert thesis_figure("retrieval", "coco-karpathy", "train", "zero-shot") is None  # seen pairs
    assert thesis_figure("retrieval_finetune", "flickr30k", "test", "thesis-retrieval-finetune")[
        "metrics"]["t2i_R@1"] == 64.6
    assert thesis_figure("zero_shot", "imagenet", "validation", "clip-80-templates-openclip-names")[
        "metrics"]["top1"] == 37.0
    glue = EVALUATIONS["glue"]
    # the thesis's per-task F-DistilBERT figures average to its GLUE score (WNLI included)
    per_task = [glue.thesis[t]["metrics"]["score"] for t in glue.combined.members]
    assert len(per_task) == 9 and round(sum(per_task) / 9, 1) == glue.thesis["glue"]["metrics"]["score"] == 76.9


def test_protocol_name_lists_what_changed():
    from trainer.eval.results import protocol_name

    recipe = {"lr": 1e-3, "epochs": 15}
    assert protocol_name("thesis-x", recipe, {"lr": 1e-3, "epochs": 15, "device": "cpu"}) == "thesis-x"
    assert protocol_name("thesis-x", recipe, {"lr": 1e-3, "epochs": 2}) == "custom (thesis-x with epochs changed)"


def test_openclip_class_names_are_the_default_and_the_thesis_list():
    """The CLIP/open_clip names the thesis used (open_clip IMAGENET_CLASSNAMES, verbatim)."""
    from shardify.sources.imagenet import imagenet_classes
    from trainer.eval.zero_shot import OPENCLIP_NAMES, openclip_imagenet_names

    synsets, wordnet = imagenet_classes()
    names = class_names({"classes": synsets, "class_names": wordnet})
    assert names == openclip_imagenet_names() and len(names) == 1000
    assert "open_clip" in OPENCLIP_NAMES.read_text().splitlines()[3] and "MIT" in OPENCLIP_NAMES.read_text()
    # known entries, in label order
    assert (names[0], names[1], names[134], names[517], names[999]) == (
        "tench", "goldfish", "crane bird", "construction crane", "toilet paper")
    assert (names[638], names[639]) == ("tights", "one-piece bathing suit")
    # the source repeats exactly two names; WordNet's first lemmas repeat "crane" and "maillot"
    dupes = {n: [i for i, m in enumerate(names) if m == n] for n in set(names) if names.count(n) > 1}
    assert dupes == {"missile": [657, 744], "sunglasses": [836, 837]} and len(set(names)) == 998
    assert wordnet.count("crane") == 2 and wordnet.count("maillot") == 2 and "crane" not in names
    assert sum(a.lower() != b.lower() for a, b in zip(names, wordnet)) == 297  # 363 counting case
    assert class_names({"classes": synsets, "class_names": wordnet}, "wordnet") == wordnet
