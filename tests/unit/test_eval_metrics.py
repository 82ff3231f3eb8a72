"""Retrieval and zero-shot metrics against naive per-query references, hand-checked cases and sklearn."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from sklearn.metrics import balanced_accuracy_score

from clipforge.eval.metrics import retrieval_hits, retrieval_metrics, zeroshot_classifier, zeroshot_metrics
from clipforge.eval.retrieval_tiled import tiled_topk
from clipforge.eval.templates import builtin_template_names, get_templates

torch.set_num_threads(1)


# ---------------------------------------------------------------- references


def naive_retrieval(image_emb, text_emb, text_to_image, ks):
    """One query at a time over the dense score matrix; a query's top k is `torch.topk` of its score row."""
    scores = text_emb @ image_emb.T
    out = {}
    for k in ks:
        hits = []
        for q in range(len(text_emb)):
            top = torch.topk(scores[q], min(k, len(image_emb))).indices.tolist()
            hits.append(int(text_to_image[q]) in top)
        out[f"image_retrieval_recall@{k}"] = sum(hits) / len(hits)
        hits = []
        for i in range(len(image_emb)):
            top = torch.topk(scores[:, i], min(k, len(text_emb))).indices.tolist()
            hits.append(any(int(text_to_image[t]) == i for t in top))
        out[f"text_retrieval_recall@{k}"] = sum(hits) / len(hits)
    return out


def positives_recall(image_emb, text_emb, text_to_image, k):
    """CLIP_benchmark's formulation: true positives among the top k over all positives, a hit when > 0."""
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True

    def recall(s, pos):
        top = torch.topk(s, k, dim=1).indices
        chosen = torch.zeros_like(pos)
        chosen.scatter_(1, top, True)
        return (chosen & pos).sum(1).float() / pos.sum(1).float()

    return (
        (recall(scores, positive) > 0).float().mean().item(),
        (recall(scores.T, positive.T) > 0).float().mean().item(),
    )


def naive_zeroshot(logits, labels):
    """CLIP_benchmark ranks each image once with topk(5) (topk(1) below 5 classes); top-1 is its first entry."""
    n, c = logits.shape
    acc = {1: 0, 5: 0}
    for i in range(n):
        ranked = torch.topk(logits[i], 5 if c >= 5 else 1).indices.tolist()
        acc[1] += int(labels[i]) == ranked[0]
        acc[5] += int(labels[i]) in ranked
    per_class = []
    for cls in sorted(set(labels.tolist())):
        rows = [i for i in range(n) if int(labels[i]) == cls]
        per_class.append(sum(int(logits[i].argmax()) == cls for i in rows) / len(rows))
    return {
        "acc1": acc[1] / n,
        "acc5": acc[5] / n if c >= 5 else math.nan,
        "mean_per_class_recall": sum(per_class) / len(per_class),
    }


def assert_metrics_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key


# ---------------------------------------------------------------- data


def random_retrieval(n_images, captions_per_image, dim, seed):
    g = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    text_to_image = torch.tensor([i for i in range(n_images)
                                  for _ in range(captions_per_image[i % len(captions_per_image)])])
    text_emb = F.normalize(image_emb[text_to_image] + 0.8 * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    perm = torch.randperm(len(text_to_image), generator=g)
    return image_emb, text_emb[perm], text_to_image[perm]


def tied_retrieval(seed):
    """Embeddings drawn from a few exactly representable unit vectors, so many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.eye(8)
    half = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, -0.5, 0.5, -0.5]])
    pool = torch.cat([basis, half])
    image_emb = pool[torch.randint(len(pool), (40,), generator=g)]
    text_to_image = torch.tensor([i for i in range(40) for _ in range(1 + i % 3)])
    text_emb = pool[torch.randint(len(pool), (len(text_to_image),), generator=g)]
    return image_emb, text_emb, text_to_image


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_naive_reference_random(seed):
    image_emb, text_emb, t2i = random_retrieval(60, [1, 2, 3], 16, seed)
    ks = (1, 5, 10)
    got = retrieval_metrics(image_emb, text_emb, t2i, ks=ks)
    assert_metrics_equal(got, naive_retrieval(image_emb, text_emb, t2i, ks))
    for k in ks:
        image_r, text_r = positives_recall(image_emb, text_emb, t2i, k)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(image_r, abs=1e-6)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(text_r, abs=1e-6)
    # The task is learnable from the noise level chosen: metrics are not degenerate.
    assert 0 < got["image_retrieval_recall@1"] < got["image_retrieval_recall@10"] <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_reference_with_exact_ties(seed):
    image_emb, text_emb, t2i = tied_retrieval(seed)
    scores = text_emb @ image_emb.T
    # Exact ties really are present at the cut-off of many rows.
    assert (scores == scores.max(dim=1, keepdim=True).values).sum(1).gt(1).any()
    ks = (1, 3, 5, 10)
    want = naive_retrieval(image_emb, text_emb, t2i, ks)
    for chunk in (1, 7, 4096):
        assert_metrics_equal(retrieval_metrics(image_emb, text_emb, t2i, ks=ks, chunk_size=chunk), want)
    for k in ks:
        image_r, text_r = positives_recall(image_emb, text_emb, t2i, k)
        assert want[f"image_retrieval_recall@{k}"] == pytest.approx(image_r)
        assert want[f"text_retrieval_recall@{k}"] == pytest.approx(text_r)


def test_retrieval_chunked_equals_unchunked():
    image_emb, text_emb, t2i = random_retrieval(50, [2, 1], 12, seed=5)
    full = retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 2, 5), chunk_size=10_000)
    for chunk in (1, 3, 16, 49):
        assert retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 2, 5), chunk_size=chunk) == full


def test_retrieval_hand_checked_example():
    # Three images on the axes; captions 0,1 describe image 0, caption 2 image 1, caption 3 image 2.
    image_emb = torch.eye(3)
    text_emb = F.normalize(
        torch.tensor([
            [1.0, 0.2, 0.0],  # image 0 first              -> hit@1
            [0.1, 1.0, 0.0],  # image 1 first, image 0 2nd -> miss@1, hit@2
            [0.0, 1.0, 0.3],  # image 1 first              -> hit@1
            [0.0, 0.0, 1.0],  # image 2 first              -> hit@1
        ]),
        dim=-1,
    )
    t2i = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 2, 10))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    # Image queries: image 0 -> caption 0 (own); image 1 -> caption 1 (0.995) beats caption 2 (0.958),
    # caption 1 belongs to image 0 -> miss@1, caption 2 is 2nd -> hit@2; image 2 -> caption 3 (own).
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    # k above the number of candidates is clamped: everything is retrieved.
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


def test_retrieval_any_caption_counts_for_text_retrieval():
    # Image 0 has two identical captions (an exact tie); only one fits in the top 1 and it is a hit.
    image_emb = torch.eye(2)
    text_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(image_emb, text_emb, torch.tensor([0, 0, 1]), ks=(1,))
    assert m == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_retrieval_rejects_bad_inputs():
    image_emb, text_emb = torch.eye(3), torch.eye(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="widths differ"):
        retrieval_metrics(image_emb, torch.eye(4)[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="k values"):
        retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1, 2]), ks=(0,))


def tie_bounds(image_emb, text_emb, text_to_image, k):
    """Per-query hit bounds whatever the tie-breaking: (pessimistic, optimistic) for both directions.

    Optimistic: a positive hits when fewer than k candidates score strictly above the best positive;
    pessimistic: when fewer than k negatives score at least as high as it.
    """
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True

    def bounds(s, pos):
        best = torch.where(pos, s, torch.tensor(float("-inf"))).max(dim=1, keepdim=True).values
        optimistic = (s > best).sum(1) < k
        pessimistic = ((s >= best) & ~pos).sum(1) < k
        return pessimistic, optimistic

    return bounds(scores, positive), bounds(scores.T, positive.T)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_retrieval_equals_dense_reference_on_random_data(seed):
    image_emb, text_emb, t2i = random_retrieval(150, [1, 3, 5], 16, seed)
    ks = (1, 5, 10)
    want = naive_retrieval(image_emb, text_emb, t2i, ks)
    dense_hits = retrieval_hits(image_emb, text_emb, t2i, ks)
    # A budget far below 150 x 450 scores forces tiles of a few rows and columns, in several shapes.
    for chunk, budget in ((7, 400), (64, 5000), (4096, 20000)):
        assert_metrics_equal(retrieval_metrics(image_emb, text_emb, t2i, ks, chunk, max_dense_scores=budget), want)
        tiled_hits = retrieval_hits(image_emb, text_emb, t2i, ks, chunk, max_dense_scores=budget)
        for k in ks:
            assert torch.equal(tiled_hits[0][k], dense_hits[0][k]) and torch.equal(tiled_hits[1][k], dense_hits[1][k])


def test_tiled_topk_lists_equal_dense_topk():
    image_emb, text_emb, _ = random_retrieval(70, [2], 12, seed=4)
    text_top, image_top = tiled_topk(image_emb, text_emb, 6, tile_rows=9, tile_cols=23)
    assert torch.equal(text_top, torch.topk(text_emb @ image_emb.T, 6, dim=1).indices)
    assert torch.equal(image_top, torch.topk(image_emb @ text_emb.T, 6, dim=1).indices)
    # Fewer candidates than k: every candidate, best first.
    text_top, image_top = tiled_topk(image_emb[:3], text_emb, 6, tile_rows=2, tile_cols=5)
    assert text_top.shape == (len(text_emb), 3) and image_top.shape == (3, 6)
    assert torch.equal(text_top, torch.topk(text_emb @ image_emb[:3].T, 3, dim=1).indices)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_retrieval_with_exact_ties_stays_within_tie_bounds(seed):
    image_emb, text_emb, t2i = tied_retrieval(seed)
    for k in (1, 3, 5):
        image_hits, text_hits = retrieval_hits(image_emb, text_emb, t2i, (k,), chunk_size=5, max_dense_scores=60)
        (img_lo, img_hi), (txt_lo, txt_hi) = tie_bounds(image_emb, text_emb, t2i, k)
        assert not (img_lo & ~image_hits[k]).any() and not (image_hits[k] & ~img_hi).any()
        assert not (txt_lo & ~text_hits[k]).any() and not (text_hits[k] & ~txt_hi).any()
        # The ties are real: the bounds differ for some queries.
        assert (img_lo != img_hi).any() or (txt_lo != txt_hi).any()


@pytest.fixture(scope="module")
def fashion_embeddings(data_cache):
    """Tiny-model embeddings of 60 real Fashion-MNIST test images and of 2 class captions per image."""
    from PIL import Image

    from clipforge.eval.embed import embed_texts
    from clipforge.eval.idx import read_idx_images
    from clipforge.models import create_model
    from clipforge.models.spec import ModelSpec

    files = {p.name: p for p in data_cache.rglob("t10k-*ubyte*")}
    if {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"} - set(files):
        pytest.skip(f"Fashion-MNIST test files not in {data_cache}")
    images, labels = read_idx_images(str(files["t10k-images-idx3-ubyte.gz"]), str(files["t10k-labels-idx1-ubyte.gz"]))
    images, labels = images[:60], torch.from_numpy(labels[:60])
    bundle = create_model(ModelSpec(name="tiny", init_seed=2))
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess_val(Image.fromarray(im).convert("RGB")) for im in images])
        image_emb = F.normalize(bundle.model.encode_image(pixels), dim=-1)
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    # Same-class images share their captions word for word: identical caption embeddings, exact ties.
    captions = [c for y in labels.tolist() for c in (f"a photo of a {names[y]}.", f"a {names[y]}")]
    text_to_image = torch.arange(60).repeat_interleave(2)
    return image_emb, embed_texts(bundle, captions), text_to_image, labels, bundle, names


def test_retrieval_on_real_fashion_mnist_equals_naive_reference(fashion_embeddings):
    image_emb, text_emb, t2i, _, _, _ = fashion_embeddings
    scores = text_emb @ image_emb.T
    assert (scores.T == scores.T.max(dim=1, keepdim=True).values).sum(1).gt(1).any()  # ties among captions
    ks = (1, 5, 10)
    want = naive_retrieval(image_emb, text_emb, t2i, ks)
    assert_metrics_equal(retrieval_metrics(image_emb, text_emb, t2i, ks), want)
    assert_metrics_equal(retrieval_metrics(image_emb, text_emb, t2i, ks, chunk_size=7), want)
    for k in ks:
        image_hits, text_hits = retrieval_hits(image_emb, text_emb, t2i, (k,), chunk_size=16, max_dense_scores=500)
        (img_lo, img_hi), (txt_lo, txt_hi) = tie_bounds(image_emb, text_emb, t2i, k)
        assert not (img_lo & ~image_hits[k]).any() and not (image_hits[k] & ~img_hi).any()
        assert not (txt_lo & ~text_hits[k]).any() and not (text_hits[k] & ~txt_hi).any()


def test_zeroshot_on_real_fashion_mnist_equals_naive_reference(fashion_embeddings):
    image_emb, _, _, labels, bundle, names = fashion_embeddings
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, names, ["a photo of a {c}.", "a {c}"])
    logits = 100.0 * image_emb @ classifier
    assert_metrics_equal(zeroshot_metrics(logits, labels), naive_zeroshot(logits, labels))


# ---------------------------------------------------------------- zero-shot metrics


@pytest.mark.parametrize("n_classes", [3, 7])
def test_zeroshot_metrics_match_naive_reference(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    labels = torch.randint(n_classes, (200,), generator=g)
    logits = torch.randn(200, n_classes, generator=g) + 1.5 * F.one_hot(labels, n_classes)
    # Quantised logits: plenty of exact ties at the top-1 / top-5 cut-offs.
    tied = torch.round(logits)
    for lg in (logits, tied):
        got = zeroshot_metrics(lg, labels)
        assert_metrics_equal(got, naive_zeroshot(lg, labels))
        assert got["mean_per_class_recall"] == pytest.approx(
            balanced_accuracy_score(labels.numpy(), lg.argmax(1).numpy()), abs=1e-12
        )
    assert math.isnan(zeroshot_metrics(logits, labels)["acc5"]) == (n_classes < 5)


def test_zeroshot_acc5_is_nan_below_five_classes():
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 1.0, 5.0, 2.0]])
    m = zeroshot_metrics(logits, torch.tensor([0, 3]))
    assert m["acc1"] == 0.5 and math.isnan(m["acc5"])
    five = zeroshot_metrics(torch.cat([logits, torch.zeros(2, 1)], dim=1), torch.tensor([0, 3]))
    assert five["acc5"] == 1.0


def test_mean_per_class_recall_on_imbalanced_classes():
    # 8 images of class 0, 2 of class 1, every prediction is class 0; class 2 is predicted never seen.
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 3)
    logits[:, 0] = 1.0
    m = zeroshot_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)  # (8/8 + 0/2) / 2: absent classes do not count
    logits[8, 1] = 2.0  # one of the two class-1 images now right
    assert zeroshot_metrics(logits, labels)["mean_per_class_recall"] == pytest.approx((1 + 0.5) / 2)


def test_zeroshot_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="logits"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0]))


# ---------------------------------------------------------------- classifier and templates


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, width=32, heads=2, layers=1),
    ).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return model, tokenizer


def test_zeroshot_classifier_averages_normalised_prompt_embeddings(small_clip):
    model, tokenizer = small_clip
    classes, templates = ["shirt", "sandal", "bag"], ["a photo of a {c}.", "a drawing of a {c}.", "a {c}"]
    weights = zeroshot_classifier(model, tokenizer, classes, templates, batch_size=2)
    assert weights.shape == (16, 3)
    with torch.no_grad():
        for j, c in enumerate(classes):
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])), dim=-1)
            want = emb.mean(0) / emb.mean(0).norm()
            assert torch.allclose(weights[:, j], want, atol=1e-5)
    assert torch.allclose(weights.norm(dim=0), torch.ones(3), atol=1e-5)
    # Batching the prompts is an implementation detail: one big batch gives the same weights.
    assert torch.allclose(zeroshot_classifier(model, tokenizer, classes, templates, batch_size=256), weights, atol=1e-5)


def test_zeroshot_classifier_class_specific_prompts(small_clip):
    model, tokenizer = small_clip
    prompts = {"cat": ["a small cat", "a cat sleeping"], "dog": ["a dog"]}
    weights = zeroshot_classifier(model, tokenizer, ["dog", "cat"], prompts)
    with torch.no_grad():
        dog = F.normalize(model.encode_text(tokenizer(["a dog"])), dim=-1)[0]
    assert torch.allclose(weights[:, 0], dog, atol=1e-5)
    with pytest.raises(ValueError, match="no prompts for class 'bird'"):
        zeroshot_classifier(model, tokenizer, ["bird"], prompts)


def test_builtin_templates():
    assert {"openai_imagenet", "fashion_mnist", "simple"} <= set(builtin_template_names())
    imagenet = get_templates("openai_imagenet")
    # CLIP's published ImageNet prompt list, as shipped with open_clip.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert imagenet == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert get_templates("simple") == ["a photo of a {c}."]
    fashion = get_templates("fashion_mnist")
    assert "a black and white picture of a {c}." in fashion and all("{c}" in t for t in fashion)


def test_templates_from_list_and_file(tmp_path):
    assert get_templates(["a {c}!", "two {c}"]) == ["a {c}!", "two {c}"]
    path = tmp_path / "prompts.json"
    path.write_text('{"cat": ["a cat"], "dog": ["a dog", "dogs"]}')
    assert get_templates(str(path)) == {"cat": ["a cat"], "dog": ["a dog", "dogs"]}
    with pytest.raises(ValueError, match="unknown template set 'imagenet'.*openai_imagenet"):
        get_templates("imagenet")
    with pytest.raises(ValueError, match=r"template #1 'no placeholder' must be a string containing `\{c\}`"):
        get_templates(["a {c}", "no placeholder"])
    with pytest.raises(ValueError, match="braces other than"):
        get_templates(["a {c} {x}"])
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        get_templates(str(tmp_path / "bad.json"))
