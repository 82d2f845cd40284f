"""Tests of grace_nb.inference: beam search against exhaustive scoring (toy decoder and tiny Flamingo), the trie
constraint, batching, free generation, retrieval and argument errors; and a smoke run of benchmarks/decode.py."""
import logging, math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grace_nb.core import GraceError
from grace_nb.inference import (DEFAULT_RETRIEVE_PROMPT, FlamingoDecoder, InferenceError, Ranked, beam_search,
                                corpus_trie, exhaustive_scores, exhaustive_top, retrieve, same_ranking)
from grace_nb.trie import TensorTrie

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    "The tiny models' ops are too small for threads; on a busy 2-core machine two threads are far slower."
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TableDecoder:
    "Toy decoder: log p(next | prompt, previous token) from a seeded random table; prompts are token ids 0..P-1."
    def __init__(self, num_prompts, vocab_size, seed=0, sharpness=2.0):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(num_prompts, vocab_size + 1, vocab_size, generator=g) * sharpness
        self.table, self.first, self.pad_token_id = torch.log_softmax(logits, -1), vocab_size, 0
    def start(self, input_ids, attention_mask, features=None):
        return self.table[input_ids[:, -1], self.first], input_ids[:, -1]
    def advance(self, prompts, rows, tokens):
        return self.table[prompts[rows], tokens], prompts[rows]
    def log_probs(self, input_ids, attention_mask, features=None):
        prev = torch.cat([torch.full_like(input_ids[:, :1], self.first), input_ids[:, 1:]], 1)
        return self.table[input_ids[:, :1], prev]


def toy_identifiers(seed, n=30, vocab=12, max_body=4):
    "n distinct identifiers of 1..max_body body tokens from 1..vocab-2, ending with vocab-1."
    rng, bodies = np.random.default_rng(seed), set()
    while len(bodies) < n: bodies.add(tuple(rng.integers(1, vocab - 1, size=rng.integers(1, max_body + 1)).tolist()))
    return [list(b) + [vocab - 1] for b in sorted(bodies)]


def toy_prompts(n):
    return torch.arange(n)[:, None], torch.ones(n, 1, dtype=torch.long)


# ---------------------------------------------------------------- toy decoder: beam search == exhaustive top-K

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5, 2.0])
def test_toy_beam_equals_exhaustive(seed, length_penalty):
    ids = toy_identifiers(seed)
    decoder, (prompts, mask) = TableDecoder(6, 12, seed=seed, sharpness=1.0 + seed % 3), toy_prompts(6)
    trie = TensorTrie.build(ids, end_token=11)
    found = beam_search(decoder, prompts, mask, trie, 11, num_beams=len(ids) + seed, num_return=8,
                        max_new_tokens=5, length_penalty=length_penalty)
    expected = exhaustive_top(exhaustive_scores(decoder, prompts, mask, ids, chunk_size=17), ids, 8, length_penalty)
    assert same_ranking(found, expected)
    assert all(len(hits) == 8 for hits in found)


def test_toy_narrow_beams_are_valid_but_approximate():
    ids = toy_identifiers(0, n=40)
    decoder, (prompts, mask) = TableDecoder(100, 12, seed=5, sharpness=1.0), toy_prompts(100)
    trie = TensorTrie.build(ids, end_token=11)
    exhaustive = exhaustive_scores(decoder, prompts, mask, ids)
    best = exhaustive_top(exhaustive, ids, 1, 0.0)
    greedy = beam_search(decoder, prompts, mask, trie, 11, num_beams=1, num_return=1, max_new_tokens=5, length_penalty=0.0)
    for got, want, row in zip(greedy, best, exhaustive):
        assert got[0][0] in ids
        assert got[0][1] <= want[0][1] + 1e-5                                  # never better than the optimum
        assert abs(got[0][1] - float(row[ids.index(got[0][0])])) < 1e-5         # and scored as its sequence scores
    assert sum(g[0][0] != b[0][0] for g, b in zip(greedy, best)) > 0            # greedy misses some: approximate


def test_toy_unconstrained_equals_exhaustive_over_all_sequences():
    "Free generation with keep_unfinished and enough beams = the best of every sequence of length <= 2."
    V, eos = 6, 5
    decoder, (prompts, mask) = TableDecoder(4, V, seed=3), toy_prompts(4)
    every = [[eos]] + [[a, b] for a in range(V) if a != eos for b in range(V)]
    found = beam_search(decoder, prompts, mask, None, eos, num_beams=V, num_return=V, max_new_tokens=2,
                        length_penalty=1.0, keep_unfinished=True)
    assert same_ranking(found, exhaustive_top(exhaustive_scores(decoder, prompts, mask, every), every, V, 1.0))
    # without keep_unfinished only ended sequences come back; 15 beams see all 5 x 6 second-step candidates
    finished_only = [c for c in every if c[-1] == eos]
    ended = beam_search(decoder, prompts, mask, None, eos, num_beams=15, num_return=V, max_new_tokens=2)
    assert same_ranking(ended, exhaustive_top(exhaustive_scores(decoder, prompts, mask, finished_only), finished_only, V, 1.0))
    narrow = beam_search(decoder, prompts, mask, None, eos, num_beams=2, num_return=2, max_new_tokens=2)
    assert all(seq[-1] == eos for hits in narrow for seq, _ in hits)


def test_toy_results_are_distinct_and_sorted():
    ids = toy_identifiers(1, n=50)
    decoder, (prompts, mask) = TableDecoder(8, 12, seed=1), toy_prompts(8)
    for trie in (TensorTrie.build(ids, end_token=11), None):
        for hits in beam_search(decoder, prompts, mask, trie, 11, num_beams=7, num_return=7, max_new_tokens=5):
            seqs, scores = [tuple(s) for s, _ in hits], [s for _, s in hits]
            assert len(set(seqs)) == len(seqs) and scores == sorted(scores, reverse=True)
            assert all(math.isfinite(s) for s in scores)
            if trie is not None: assert all(list(s) in ids for s in seqs) and len(seqs) == 7


def test_fewer_identifiers_than_returns():
    ids = [[1, 11], [2, 3, 11]]
    decoder, (prompts, mask) = TableDecoder(2, 12), toy_prompts(2)
    found = beam_search(decoder, prompts, mask, TensorTrie.build(ids, end_token=11), 11, num_beams=5, num_return=5)
    assert [sorted(s for s, _ in hits) for hits in found] == [ids, ids]


# ---------------------------------------------------------------- tiny Flamingo

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny Flamingo (2-layer, 64-wide LM), 30 shapes images with structured identifiers of 2-4 tokens + eoc."
    import transformers
    from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
    from grace_nb.data import load_karpathy, write_shapes_corpus
    from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
    logging.getLogger().setLevel(logging.ERROR); transformers.utils.logging.disable_progress_bar()
    tmp = tmp_path_factory.mktemp("inference")
    shapes = load_karpathy(write_shapes_corpus(tmp/"shapes", n_train=0, n_val=0, n_test=30, progress=False))
    captions = [c for r in shapes.records for c in r.captions]
    tokenizer = train_bpe_tokenizer(captions + [DEFAULT_RETRIEVE_PROMPT], vocab_size=350, numbers=50)
    lm = tiny_lm_config(len(tokenizer), d_model=64, n_layers=2, n_heads=2)
    flamingo = load_flamingo(write_tiny_preset(tmp/"tiny", tokenizer, lm_config=lm, seed=0))
    image_ids = [r.image_id for r in shapes.records]
    structured = build_identifiers("structured", image_ids, embeddings=np.random.default_rng(0).normal(size=(30, 8)), k=4, c=4)
    grow_vocabulary(flamingo, structured)
    with torch.no_grad():  # sharper next-token distributions than the random init: fewer near-ties
        flamingo.model.lang_encoder.transformer.norm_f.weight.mul_(4.0)
    token_ids = identifier_token_ids(structured, flamingo.tokenizer)
    eoc = flamingo.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    distinct = list(map(list, dict.fromkeys(map(tuple, token_ids.values()))))
    flamingo.model.eval()
    return dict(flamingo=flamingo, shapes=shapes, captions=captions, token_ids=token_ids, eoc=eoc, ids=distinct,
                image_ids=image_ids, decoder=FlamingoDecoder(flamingo.model, flamingo.tokenizer.pad_token_id))


def _batch(tiny, texts):
    prompts = [DEFAULT_RETRIEVE_PROMPT.format(query=t) for t in texts]
    return tiny["flamingo"].tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flamingo_beam_equals_exhaustive(tiny, seed):
    rng = np.random.default_rng(seed)
    texts = [tiny["captions"][i] for i in rng.choice(len(tiny["captions"]), 3, replace=False)]
    ids = [tiny["ids"][i] for i in sorted(rng.choice(len(tiny["ids"]), 20, replace=False))]  # a different corpus per seed
    batch, trie = _batch(tiny, texts), TensorTrie.build(ids, end_token=tiny["eoc"])
    exhaustive = exhaustive_scores(tiny["decoder"], batch.input_ids, batch.attention_mask, ids, chunk_size=23)
    for lp in (0.0, 1.0):
        found = beam_search(tiny["decoder"], batch.input_ids, batch.attention_mask, trie, tiny["eoc"],
                            num_beams=len(ids), num_return=10, max_new_tokens=max(map(len, ids)), length_penalty=lp)
        expected = exhaustive_top(exhaustive, ids, 10, lp)
        assert same_ranking(found, expected, atol=1e-4)
        assert max(abs(f[1] - e[1]) for fs, es in zip(found, expected) for f, e in zip(fs, es)) < 1e-4


def test_flamingo_decoder_matches_full_forward(tiny):
    decoder, batch = tiny["decoder"], _batch(tiny, tiny["captions"][:3])
    lp, state = decoder.start(batch.input_ids, batch.attention_mask)
    rows, steps = torch.tensor([2, 0, 0, 1]), torch.tensor([[5, 9, 7, 11], [3, 30, 8, 4], [6, 6, 6, 6]])
    lp, state = decoder.advance(state, rows, steps[0])
    lp, state = decoder.advance(state, torch.tensor([3, 1, 2, 0]), steps[1])  # a reorder between steps
    rows2 = rows[torch.tensor([3, 1, 2, 0])]
    lp, state = decoder.advance(state, torch.arange(4), steps[2])
    whole = torch.cat([batch.input_ids[rows2], torch.stack([steps[0][[3, 1, 2, 0]], steps[1], steps[2]], 1)], 1)
    mask = torch.cat([batch.attention_mask[rows2], torch.ones(4, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(lp, decoder.log_probs(whole, mask)[:, -1], atol=1e-4, rtol=0)


def test_flamingo_constrained_results_are_distinct_identifiers(tiny):
    batch = _batch(tiny, tiny["captions"][:6])
    trie = corpus_trie(tiny["token_ids"], tiny["eoc"])
    found = beam_search(tiny["decoder"], batch.input_ids, batch.attention_mask, trie, tiny["eoc"], num_beams=4,
                        num_return=4, max_new_tokens=max(map(len, tiny["ids"])))
    for hits in found:
        assert len(hits) == 4 and len({tuple(s) for s, _ in hits}) == 4
        assert all(seq in tiny["ids"] for seq, _ in hits)


def test_flamingo_batch_equals_one_by_one(tiny):
    texts = ["a red circle", tiny["captions"][7], tiny["captions"][3] + " " + tiny["captions"][4]]  # different lengths
    batch = _batch(tiny, texts)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3
    search = dict(trie=corpus_trie(tiny["token_ids"], tiny["eoc"]), eos_token_id=tiny["eoc"], num_beams=6,
                  num_return=6, max_new_tokens=max(map(len, tiny["ids"])))
    together = beam_search(tiny["decoder"], batch.input_ids, batch.attention_mask, **search)
    for text, hits in zip(texts, together):
        alone = beam_search(tiny["decoder"], **_batch(tiny, [text]), **search)
        assert same_ranking([hits], alone, atol=1e-4)


def test_flamingo_image_prompts_equal_exhaustive(tiny):
    from grace_nb.backbone import vision_features
    flamingo, model = tiny["flamingo"], tiny["flamingo"].model
    images = torch.stack([flamingo.image_processor(tiny["shapes"].load_image(r)) for r in tiny["shapes"].records[:2]])
    feats = vision_features(model, images)
    blocks = [b for b in model.lang_encoder.gated_cross_attn_layers if b is not None]  # None: a layer without one
    gates = [(b.attn_gate.data.clone(), b.ff_gate.data.clone()) for b in blocks]
    try:
        for block in blocks: block.attn_gate.data.fill_(1.0); block.ff_gate.data.fill_(1.0)
        batch = flamingo.tokenizer(["<image>a picture of", "<image>a"], padding=True, padding_side="left", return_tensors="pt")
        ids = tiny["ids"][:15]
        exhaustive = exhaustive_scores(tiny["decoder"], batch.input_ids, batch.attention_mask, ids, features=feats)
        found = beam_search(tiny["decoder"], batch.input_ids, batch.attention_mask, TensorTrie.build(ids, end_token=tiny["eoc"]),
                            tiny["eoc"], num_beams=15, num_return=5, max_new_tokens=5, length_penalty=0.0, features=feats)
        assert same_ranking(found, exhaustive_top(exhaustive, ids, 5, 0.0))
        blind = exhaustive_scores(tiny["decoder"], batch.input_ids, batch.attention_mask, ids, features=feats * 0)
        assert (blind - exhaustive).abs().max() > 1e-3  # the test would notice steps that ignore the image
    finally:
        for block, (attn, ff) in zip(blocks, gates): block.attn_gate.data, block.ff_gate.data = attn, ff


# ---------------------------------------------------------------- retrieve

def test_retrieve_constrained(tiny):
    queries = tiny["captions"][:5]
    ranked = retrieve(tiny["flamingo"], queries, tiny["token_ids"], num_beams=6, num_return=6, batch_size=2, progress=False)
    assert len(ranked) == 5 and all(isinstance(r, Ranked) for r in ranked)
    for r in ranked:
        assert len(r.identifiers) == 6 and r.invalid == 0 and r.unfinished == 0
        assert r.image_ids == [i for ids in r.images_per_identifier for i in ids]
        assert all(tiny["token_ids"][i] == seq for i, seq in zip(r.image_ids, r.identifiers))  # no collisions here
        assert r.scores == sorted(r.scores, reverse=True)
    # the same as beam search on the batch, and batch_size does not matter
    batch = _batch(tiny, queries)
    found = beam_search(tiny["decoder"], batch.input_ids, batch.attention_mask, corpus_trie(tiny["token_ids"], tiny["eoc"]),
                        tiny["eoc"], num_beams=6, num_return=6, max_new_tokens=max(map(len, tiny["ids"])))
    assert same_ranking([list(zip(r.identifiers, r.scores)) for r in ranked], found)
    assert tiny["flamingo"].model.training is False


def test_retrieve_restores_training_mode_and_accepts_a_trie(tiny):
    model = tiny["flamingo"].model
    model.train()
    try:
        trie = corpus_trie(tiny["token_ids"], tiny["eoc"])
        a = retrieve(tiny["flamingo"], tiny["captions"][:2], tiny["token_ids"], trie=trie, num_beams=3, num_return=3, progress=False)
        b = retrieve(tiny["flamingo"], tiny["captions"][:2], tiny["token_ids"], trie="auto", num_beams=3, num_return=3, progress=False)
        assert model.training
        assert [r.identifiers for r in a] == [r.identifiers for r in b]
    finally: model.eval()


def test_retrieve_collisions_keep_map_order(tiny):
    ids = tiny["image_ids"]
    collided = {ids[5]: tiny["token_ids"][ids[0]], **{i: tiny["token_ids"][i] for i in ids if i != 5}}  # 5 first in map order
    ranked = retrieve(tiny["flamingo"], tiny["captions"][:1], collided, num_beams=29, num_return=29, progress=False)[0]
    position = [tuple(s) for s in ranked.identifiers].index(tuple(tiny["token_ids"][ids[0]]))
    assert ranked.images_per_identifier[position] == [ids[5], ids[0]]
    assert sorted(ranked.image_ids) == sorted(ids) and len(ranked.identifiers) == 29


def test_retrieve_unconstrained(tiny):
    ranked = retrieve(tiny["flamingo"], tiny["captions"][:3], tiny["token_ids"], constrained=False, num_beams=4,
                      num_return=4, progress=False)
    corpus = {tuple(v) for v in tiny["token_ids"].values()}
    for r in ranked:
        assert len(r.identifiers) == 4                                          # cut beams fill the slots
        assert r.invalid == sum(tuple(s) not in corpus for s in r.identifiers)
        assert r.unfinished == sum(s[-1] != tiny["eoc"] for s in r.identifiers)
        assert len({tuple(s) for s in r.identifiers}) == 4
        assert all(len(s) <= max(map(len, tiny["ids"])) for s in r.identifiers)


# ---------------------------------------------------------------- errors

def test_errors(tiny):
    flamingo, token_ids, eoc = tiny["flamingo"], tiny["token_ids"], tiny["eoc"]
    queries = tiny["captions"][:2]
    with pytest.raises(InferenceError, match="num_return must be in 1..num_beams=3"):
        retrieve(flamingo, queries, token_ids, num_beams=3, num_return=5, progress=False)
    with pytest.raises(InferenceError, match="no queries"): retrieve(flamingo, [], token_ids, progress=False)
    with pytest.raises(InferenceError, match="one string"): retrieve(flamingo, "a red circle", token_ids, progress=False)
    with pytest.raises(InferenceError, match="query 1 is a int"): retrieve(flamingo, ["a", 3], token_ids, progress=False)
    bad = dict(token_ids); bad[tiny["image_ids"][4]] = token_ids[tiny["image_ids"][4]][:-1]
    with pytest.raises(InferenceError, match=f"image {tiny['image_ids'][4]} does not end with the end token {eoc}"):
        retrieve(flamingo, queries, bad, progress=False)
    with pytest.raises(InferenceError, match="token_ids is empty"): retrieve(flamingo, queries, {}, progress=False)
    with pytest.raises(InferenceError, match="no {query} field"):
        retrieve(flamingo, queries, token_ids, prompt_template="Identifier:", progress=False)
    with pytest.raises(InferenceError, match="max_new_tokens must be at least 1"):
        retrieve(flamingo, queries, token_ids, max_new_tokens=0, progress=False)
    with pytest.raises(InferenceError, match="trie must be None, 'auto' or a TensorTrie"):
        retrieve(flamingo, queries, token_ids, trie="yes", progress=False)
    decoder, (prompts, mask) = TableDecoder(2, 12), toy_prompts(2)
    trie = TensorTrie.build([[1, 11]], end_token=11)
    with pytest.raises(InferenceError, match="end with token 11, but eos_token_id is 3"): beam_search(decoder, prompts, mask, trie, 3)
    with pytest.raises(InferenceError, match="num_beams must be at least 1"): beam_search(decoder, prompts, mask, trie, 11, num_beams=0)
    with pytest.raises(InferenceError, match="does not match input_ids"): beam_search(decoder, prompts, mask[:, :0], trie, 11)
    with pytest.raises(InferenceError, match="non-empty"): beam_search(decoder, prompts[:0], mask[:0], trie, 11)
    with pytest.raises(InferenceError, match="features has 1 rows for 2 prompts"):
        beam_search(decoder, prompts, mask, trie, 11, features=torch.zeros(1, 4, 8))
    with pytest.raises(InferenceError, match="1 empty"): exhaustive_scores(decoder, prompts, mask, [[1, 11], []])
    assert issubclass(InferenceError, GraceError) and issubclass(InferenceError, ValueError)


# ---------------------------------------------------------------- benchmark smoke run

def test_decode_benchmark_quick_runs():
    out = subprocess.run([sys.executable, str(ROOT/"benchmarks"/"decode.py"), "--quick"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| identifiers | mode" in out.stdout and "constrained / unconstrained" in out.stdout
    for kind in ("structured", "atomic"): assert kind in out.stdout
