"""Tests of grace_nb.clip: Recall@K and exact search against brute force, deterministic training, save/load through open_clip."""
import math

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from grace_nb.backbone import tiny_clip_config
from grace_nb.clip import (ClipError, ClipRun, clip_batch, create_clip, encode_images, encode_texts, evaluate_clip,
                           exact_search, image_embedding_table, load_clip, recall_at_k, save_clip, train_clip,
                           warmup_cosine)
from grace_nb.core import GraceError
from grace_nb.data import load_karpathy, write_shapes_corpus

# a very small CLIP under its own name, so the tests are quick and leave "grace-tiny-clip" as others registered it
CONFIG = tiny_clip_config(patch_size=16, width=32, layers=1, embed_dim=16, text_width=32, text_layers=1, context_length=16)
NAME, DIM = "grace-test-clip", 16
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- Recall@K

def brute_force_recall(ranked, gold, k):
    "Percentage of queries whose gold id is among the first k of their list (None = miss)."
    return 100 * sum(1 for r, g in zip(ranked, gold) if r is not None and g in list(r)[:k]) / len(gold)


rankings = st.lists(st.tuples(st.one_of(st.none(), st.lists(st.integers(0, 12), max_size=15)), st.integers(0, 12)),
                    min_size=1, max_size=40)


@FAST
@given(rankings, st.lists(st.integers(1, 20), min_size=1, max_size=4))
def test_recall_matches_brute_force(pairs, ks):
    ranked, gold = [r for r, _ in pairs], [g for _, g in pairs]
    got = recall_at_k(ranked, gold, ks=tuple(ks))
    assert got == {f"R@{k}": pytest.approx(brute_force_recall(ranked, gold, k)) for k in ks}


def test_recall_by_hand_and_failures_stay_in_denominator():
    # rank 1 hit, rank 3 hit, short-list miss, failed parse, empty list
    got = recall_at_k([[7, 2, 9], [4, 1, 3, 8], [5], None, []], [7, 3, 6, 2, 1])
    assert got == {"R@1": 20.0, "R@5": 40.0, "R@10": 40.0}
    assert recall_at_k([None, None], [1, 2]) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}


def test_recall_counts_first_occurrence_and_accepts_numpy():
    assert recall_at_k([[1, 1, 1, 1, 1, 2]], [2], ks=(5, 6)) == {"R@5": 0.0, "R@6": 100.0}
    ranked = np.array([[3, 1, 2], [2, 3, 1]])
    assert recall_at_k(ranked, np.array([1, 2]), ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}


@pytest.mark.parametrize("ranked, gold, ks, message", [
    ([[1]], [1, 2], (1,), "one of each per query"),
    ([], [], (1,), "no queries"),
    ([[1]], [1], (0,), "positive integers"),
    ([[1]], [1], (), "positive integers"),
])
def test_recall_errors(ranked, gold, ks, message):
    with pytest.raises(ClipError, match=message): recall_at_k(ranked, gold, ks)
    assert issubclass(ClipError, GraceError)


# ---------------------------------------------------------------- exact search

@FAST
@given(st.integers(1, 30), st.integers(1, 25), st.integers(1, 8), st.integers(1, 12), st.integers(0, 10_000))
def test_exact_search_matches_full_sort(n_queries, n_images, dim, k, seed):
    rng = np.random.default_rng(seed)
    queries, images = rng.normal(size=(n_queries, dim)), rng.normal(size=(n_images, dim))
    scores, indices = exact_search(queries, images, k=k, batch_size=7)
    sims = queries.astype(np.float32) @ images.astype(np.float32).T
    kk = min(k, n_images)
    assert indices.shape == scores.shape == (n_queries, kk)
    # the scores are the k largest, best first, and each index points at its score
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :kk], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, indices, 1), scores, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == kk for row in indices.tolist())


def test_exact_search_errors():
    with pytest.raises(ClipError, match="same D"): exact_search(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ClipError, match="empty"): exact_search(np.ones((2, 3)), np.ones((0, 3)))
    with pytest.raises(ClipError, match="k must be"): exact_search(np.ones((2, 3)), np.ones((4, 3)), k=0)


# ---------------------------------------------------------------- batches and schedule

def test_clip_batch_is_deterministic_distinct_and_in_range():
    first, counts = np.array([0, 5, 8, 13]), np.array([5, 3, 5, 2])
    a = clip_batch(first, counts, 3, seed=4, step=7)
    b = clip_batch(first, counts, 3, seed=4, step=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    images, captions = clip_batch(first, counts, 10, seed=0, step=0)  # batch larger than the corpus: all images once
    assert sorted(images.tolist()) == [0, 1, 2, 3]
    assert all(first[i] <= c < first[i] + counts[i] for i, c in zip(images, captions))
    steps = {tuple(clip_batch(first, counts, 2, seed=0, step=s)[0]) for s in range(20)}
    assert len(steps) > 1  # different steps draw different batches


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- training, encoding, saving

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return load_karpathy(write_shapes_corpus(folder, n_train=16, n_val=0, n_test=6, seed=3, progress=False), progress=False)


@pytest.fixture(scope="module")
def short_run(corpus):
    return train_clip(corpus, steps=3, batch_size=8, progress=False, log_every=2, config=CONFIG, name=NAME)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_is_deterministic_for_a_seed(corpus, short_run):
    again = train_clip(corpus, steps=3, batch_size=8, progress=False, log_every=2, config=CONFIG, name=NAME)
    other = train_clip(corpus, steps=3, batch_size=8, progress=False, log_every=2, config=CONFIG, name=NAME, seed=1)
    assert _same_weights(short_run.model, again.model)
    assert not _same_weights(short_run.model, other.model)
    assert short_run.history == again.history
    assert [h["step"] for h in short_run.history] == [2, 3]
    assert not short_run.model.training


def test_training_changes_the_weights(corpus, short_run):
    untrained = create_clip(CONFIG, name=NAME, seed=0)[0]
    assert not torch.equal(untrained.visual.proj, short_run.model.visual.proj)
    assert math.isfinite(short_run.history[-1]["loss"])


def test_train_clip_errors(corpus):
    with pytest.raises(ClipError, match="at least 2"): train_clip(corpus, split="val", steps=1, progress=False)
    with pytest.raises(ClipError, match="steps"): train_clip(corpus, steps=0, progress=False)
    with pytest.raises(ClipError, match="init_temperature"): train_clip(corpus, steps=1, init_temperature=0, progress=False)


def test_initial_temperature_is_applied(corpus):
    run = train_clip(corpus, steps=1, batch_size=4, lr=1e-9, init_temperature=0.25, config=CONFIG, name=NAME, progress=False)
    assert run.model.logit_scale.exp().item() == pytest.approx(4.0, rel=1e-4)
    assert run.hparams["init_temperature"] == 0.25


def test_create_clip_registry_follows_the_last_config(tmp_path):
    small = create_clip(CONFIG, name="grace-test-registry")[0]
    wider = dict(CONFIG, embed_dim=24)
    assert create_clip(wider, name="grace-test-registry")[0].visual.output_dim == 24
    assert open_clip.get_model_config("grace-test-registry")["embed_dim"] == 24
    assert small.visual.output_dim == DIM
    with pytest.raises(ClipError, match="not found"): create_clip(CONFIG, name=NAME, weights=tmp_path/"none.safetensors")


def test_create_clip_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    create_clip(CONFIG, name=NAME, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())


def test_encoders_are_normalised_and_agree_with_bare_model(corpus, short_run):
    records = corpus.split("test")
    emb = encode_images(short_run, corpus, records, batch_size=4, progress=False)
    assert emb.shape == (6, DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(encode_images(short_run.model, corpus, records, progress=False), emb, atol=1e-6)
    texts = encode_texts(short_run, None, ["a red circle", "two shapes", "a blue star"], batch_size=2)
    assert texts.shape == (3, DIM) and texts.dtype == np.float32
    np.testing.assert_allclose(encode_texts(short_run.model, short_run.tokenizer, ["a red circle"]), texts[:1], atol=1e-6)
    assert encode_texts(short_run, None, []).shape == (0, DIM)
    with pytest.raises(ClipError, match="tokenizer"): encode_texts(short_run.model, None, ["x"])
    with pytest.raises(ClipError, match="list of strings"): encode_texts(short_run, None, "a red circle")


def test_evaluate_clip(corpus, short_run):
    result = evaluate_clip(short_run, corpus, progress=False)
    assert result["n_queries"] == 30 and result["n_images"] == 6
    assert 0 <= result["R@1"] <= result["R@5"] <= result["R@10"] == 100.0  # 6 images: all are in the top 10
    with pytest.raises(ClipError, match="no images"): evaluate_clip(short_run, corpus, split="val", progress=False)


def test_evaluate_clip_matches_manual_ranking(corpus, short_run):
    records, queries = corpus.split("test"), corpus.queries("test")
    sims = encode_texts(short_run, None, [q for q, _ in queries]) @ encode_images(short_run, corpus, records, progress=False).T
    ids = np.array([r.image_id for r in records])
    gold = np.array([g for _, g in queries])
    r1 = 100 * np.mean(ids[sims.argmax(1)] == gold)
    assert evaluate_clip(short_run, corpus, ks=(1,), progress=False)["R@1"] == pytest.approx(r1)


def test_save_load_roundtrip_through_open_clip(tmp_path, short_run):
    path = save_clip(short_run, tmp_path/"clip"/"run.safetensors")
    assert path.is_file() and (tmp_path/"clip"/"run.json").is_file()
    loaded = load_clip(path)
    assert isinstance(loaded, ClipRun) and _same_weights(loaded.model, short_run.model)
    assert loaded.history == short_run.history and loaded.hparams == short_run.hparams
    # the file is what the tiny Flamingo preset hands to open_clip as `pretrained`
    from_file = open_clip.create_model(NAME, pretrained=str(path))
    assert _same_weights(from_file.visual, short_run.model.visual)
    with pytest.raises(ClipError, match=".safetensors"): save_clip(short_run, tmp_path/"run.pt")
    with pytest.raises(ClipError, match="not found"): load_clip(tmp_path/"missing.safetensors")


def test_image_embedding_table(corpus, short_run):
    table = image_embedding_table(short_run, corpus, progress=False)
    assert sorted(table) == sorted(r.image_id for r in corpus.records)
    record = corpus.split("test")[2]
    np.testing.assert_allclose(table[record.image_id], encode_images(short_run, corpus, [record], progress=False)[0], atol=1e-6)


def test_recall_interval_matches_exact_enumeration():
    "The bootstrap interval against a hand-computed case: every resample of 3 images enumerated (27, equally likely)."
    import itertools
    from grace_nb.clip import recall_interval
    # image 0: 2 queries, both hits at rank 1; image 1: 1 query, a hit at rank 3; image 2: 2 queries, misses
    ranked, gold = [[0], [0, 1], [5, 4, 1], [0], [1]], [0, 0, 1, 2, 2]
    hits1, hits5, queries = [2, 0, 0], [2, 1, 0], [2, 1, 2]
    exact1 = sorted(100 * sum(hits1[i] for i in s) / sum(queries[i] for i in s) for s in itertools.product(range(3), repeat=3))
    exact5 = sorted(100 * sum(hits5[i] for i in s) / sum(queries[i] for i in s) for s in itertools.product(range(3), repeat=3))
    # 2.5th and 97.5th percentiles of the exact distribution: its smallest and largest values (each has mass 1/27 > 2.5%)
    assert (exact1[0], exact1[-1]) == (0.0, 100.0) and (exact5[0], round(exact5[-1], 2)) == (0.0, 100.0)
    got = recall_interval(ranked, gold, ks=(1, 5), n_boot=20_000)
    assert got == {"R@1": [0.0, 100.0], "R@5": [0.0, 100.0]}
    # an 80% interval falls inside the distribution: the 10th / 90th percentiles of the 27 values
    got80 = recall_interval(ranked, gold, ks=(1,), n_boot=50_000, level=0.8)["R@1"]
    assert got80 == pytest.approx([float(np.percentile(exact1, 10)), float(np.percentile(exact1, 90))], abs=0.5)
    with pytest.raises(ClipError): recall_interval(ranked, gold, level=1.0)


def test_recall_interval_resamples_images_not_queries():
    "Five identical outcomes per image: the interval is as wide as the image count says, wider than for single queries."
    from grace_nb.clip import recall_interval
    rng = np.random.default_rng(1)
    hit = rng.random(40) < 0.5
    gold = [i for i in range(40) for _ in range(5)]
    ranked = [[i] if hit[i] else [] for i in gold]
    grouped = recall_interval(ranked, gold, ks=(1,))["R@1"]
    single = recall_interval(ranked, gold, ks=(1,), groups=range(len(gold)))["R@1"]  # queries as if independent
    assert grouped[0] <= 100 * hit.mean() <= grouped[1] and single[0] <= 100 * hit.mean() <= single[1]
    assert single[1] - single[0] > 5  # a real interval, not a point
    assert grouped[1] - grouped[0] > 1.8 * (single[1] - single[0])  # sqrt(5) = 2.2 times wider, about
    with pytest.raises(ClipError, match="groups"): recall_interval(ranked, gold, groups=[0])
