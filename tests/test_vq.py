"Image-tokenization (vq) identifiers: residual quantization, collision breaking against brute force, the map and its tokens."
import itertools, json

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from grace_nb.identifiers import (IdentifierError, IdentifierMap, add_identifier_tokens, build_identifiers,
                                  identifier_kind, identifier_kinds, identifier_token_ids, train_bpe_tokenizer)
from grace_nb.vq import break_collisions, code_collisions, residual_quantize, vq_identifiers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blobs():
    embeddings, labels = make_blobs(n_samples=150, centers=4, n_features=8, random_state=2)
    return list(range(300, 450)), embeddings, labels


def test_codes_are_nearest_centroids_and_errors_fall(blobs):
    _, emb, _ = blobs
    rq = residual_quantize(emb, levels=4, codebook_size=6, seed=1)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    residual = x.copy()
    for level, book in enumerate(rq.codebooks):
        if level == len(rq.codebooks) - 1: np.testing.assert_allclose(rq.residuals, residual)
        nearest = ((residual[:, None] - book[None]) ** 2).sum(-1).argmin(1)
        assert (rq.codes[:, level] == nearest).all()
        residual = residual - book[nearest]
    assert all(a >= b for a, b in zip(rq.relative_errors, rq.relative_errors[1:]))
    assert rq.relative_errors[-1] == pytest.approx(float((residual ** 2).sum(1).mean()), rel=1e-9)


def test_codebook_is_capped_at_the_number_of_rows():
    rq = residual_quantize(np.eye(3), levels=2, codebook_size=256)
    assert [len(b) for b in rq.codebooks] == [3, 3]


def _brute(rows, residuals, codebook):
    cost = ((residuals[rows][:, None] - codebook[None]) ** 2).sum(-1)
    return min(cost[range(len(rows)), list(p)].sum() for p in itertools.permutations(range(len(codebook)), len(rows)))


@pytest.mark.parametrize("seed", range(8))
def test_break_collisions_is_optimal_and_minimal(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 12)), 5
    codes = np.stack([rng.integers(0, 2, n), rng.integers(0, k, n)], 1)  # many collisions, groups of about n / 2
    prefix_sizes = np.bincount(codes[:, 0])
    if prefix_sizes.max() > k:
        with pytest.raises(IdentifierError, match="larger codebook_size"): break_collisions(codes, rng.normal(size=(n, 3)), rng.normal(size=(k, 3)))
        return
    residuals, book = rng.normal(size=(n, 3)), rng.normal(size=(k, 3))
    new = break_collisions(codes, residuals, book)
    assert code_collisions(new)["images_in_collisions"] == 0
    assert (new[:, 0] == codes[:, 0]).all()
    for p in np.unique(codes[:, 0]):
        rows = np.flatnonzero(codes[:, 0] == p)
        if len(set(codes[rows, 1])) == len(rows): assert (new[rows] == codes[rows]).all()  # no collision: untouched
        else: assert ((residuals[rows] - book[new[rows, 1]]) ** 2).sum() == pytest.approx(_brute(rows, residuals, book))


def test_identical_embeddings_get_distinct_identifiers(blobs):
    ids, emb, _ = blobs
    dup = np.concatenate([emb[:20], np.repeat(emb[:1], 6, axis=0)])  # 7 copies of one image
    m = vq_identifiers(range(26), dup, codebook_size=8, seed=0)
    assert len(set(m.identifiers.values())) == 26
    assert m.params["images_in_collisions_before"] >= 7 and m.params["last_codes_changed"] >= 6
    assert m.collision_summary()["collision_rate"] == 0.0


def test_map_shape_tokens_and_determinism(blobs):
    ids, emb, _ = blobs
    m = vq_identifiers(ids, emb, codebook_size=8, seed=3)
    assert m.kind == "vq" and len(m) == 150
    assert all(len(s.split()) == 4 and all(t.startswith(f"V_{l + 1}_") for l, t in enumerate(s.split())) for s in m.identifiers.values())
    assert set(m.new_tokens) == {t for s in m.identifiers.values() for t in s.split()} and len(m.new_tokens) <= 32
    assert vq_identifiers(ids, emb, codebook_size=8, seed=3) == m
    assert vq_identifiers(ids, emb, codebook_size=8, seed=4).identifiers != m.identifiers


def test_bad_input_is_named():
    with pytest.raises(IdentifierError, match="N = 2 images"): vq_identifiers([1, 2], np.ones((3, 2)))
    emb = np.ones((2, 2)); emb[1, 1] = np.inf
    with pytest.raises(IdentifierError, match="image 9"): vq_identifiers([8, 9], emb)
    with pytest.raises(IdentifierError, match="codebook_size must be"): vq_identifiers([1, 2], np.eye(2), codebook_size=1)
    with pytest.raises(IdentifierError, match="levels must be"): vq_identifiers([1, 2], np.eye(2), levels=1)
    with pytest.raises(IdentifierError, match="duplicate image ids"): vq_identifiers([1, 1], np.eye(2))


def test_registered_kind_dispatch_and_validation(blobs, tmp_path):
    ids, emb, _ = blobs
    assert "vq" in identifier_kinds() and identifier_kind("vq").unique and identifier_kind("vq").new_tokens
    with pytest.raises(IdentifierError, match="vq identifiers need `embeddings`"): build_identifiers("vq", ids)
    m = build_identifiers("vq", ids, embeddings=emb, codebook_size=8, seed=3)
    assert m == vq_identifiers(ids, emb, codebook_size=8, seed=3)
    back = IdentifierMap.load(m.save(tmp_path/"vq.json"))
    assert back == m and json.loads((tmp_path/"vq.json").read_text())["params"]["codebook_size"] == 8
    with pytest.raises(IdentifierError, match="share"): IdentifierMap("vq", {1: "V_1_1", 2: "V_1_1"}, ["V_1_1"])
    with pytest.raises(IdentifierError, match="not in new_tokens"): IdentifierMap("vq", {1: "V_1_2"}, ["V_1_1"])


def test_tokens_are_whole_vocabulary_entries(blobs):
    ids, emb, _ = blobs
    m = vq_identifiers(ids, emb, codebook_size=8, seed=3)
    tok = train_bpe_tokenizer(["a picture of a blob", "V is a letter"], vocab_size=300)
    with pytest.raises(IdentifierError, match="lacks"): identifier_token_ids(m, tok)
    assert add_identifier_tokens(tok, m) == len(m.new_tokens)
    token_ids = identifier_token_ids(m, tok)
    vocab = tok.get_vocab()
    for i in ids[:10]: assert token_ids[i][:-1] == [vocab[t] for t in m[i].split()]
    assert len({tuple(v) for v in token_ids.values()}) == len(ids)
