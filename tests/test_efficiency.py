"""Tests of Figure 4's modules (grace_nb.efficiency, grace_latency, clip_latency, figure4): faiss exact search against numpy brute force, the strawman's ranking, IVF recall,
synthetic identifiers against the real builders, the last-position decoder, the GRACE timer, crossovers, and a
smoke run of benchmarks/efficiency.py."""
import importlib.util, logging, math
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from grace_nb.core import GraceError
from grace_nb.efficiency import (EfficiencyError, benchmark_queries, benchmark_tokenizer, median_pass_ms, structured_codes,
                                 synthetic_embeddings, synthetic_identifiers, synthetic_queries)
from grace_nb.grace_latency import LastLogitsDecoder, prompt_batches, random_flamingo, set_vocab_size, time_grace
from grace_nb.clip_latency import (blas_from, flat_index, ivf_index, recall_vs_exact, set_faiss_threads, strawman_search,
                                   time_search, tune_nprobe)
from grace_nb.figure4 import crossover, run_efficiency
from grace_nb.identifiers import identifier_token_ids, numeric_identifiers, string_identifiers
from grace_nb.inference import FlamingoDecoder, beam_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    "Single-threaded torch and faiss, as the benchmark runs (and a busy 2-core machine prefers)."
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1); faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads); faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def corpus():
    images = synthetic_embeddings(3_000, 32, seed=0)
    return images, synthetic_queries(images, 40, seed=1)[0]


@pytest.fixture(scope="module")
def tokenizer():
    logging.getLogger().setLevel(logging.ERROR)
    return benchmark_tokenizer(benchmark_queries(60))


def numpy_top_k(queries, images, k):
    "Brute force in float64: indices of the k largest inner products per query, best first."
    scores = queries.astype(np.float64) @ images.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], np.sort(scores, axis=1)[:, ::-1][:, :k]


# ---------------------------------------------------------------- CLIP side

@pytest.mark.parametrize("blas", [False, True])
def test_faiss_exact_search_equals_numpy_brute_force(corpus, blas):
    images, queries = corpus
    previous = blas_from(1 if blas else 10**6, images.shape[1])  # force the BLAS path or the per-query kernels
    try: scores, found = flat_index(images).search(queries, 10)
    finally: faiss.cvar.distance_compute_blas_threshold = previous
    expected, expected_scores = numpy_top_k(queries, images, 10)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    gaps = np.diff(expected_scores, axis=1)
    assert (found == expected).mean() == 1.0 or np.abs(gaps).min() < 1e-5  # same ids unless two scores tie


def test_strawman_ranks_as_exact_search(corpus):
    images, queries = corpus
    scaled = images * np.random.default_rng(0).uniform(0.5, 2.0, size=(len(images), 1)).astype(np.float32)
    # the strawman re-normalises, so scaling the stored embeddings must not change its ranking
    assert (strawman_search(queries[:10], scaled) == numpy_top_k(queries[:10], images, 10)[0]).all()


def test_recall_vs_exact_counts_overlap():
    assert recall_vs_exact(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [7, 8, 4]])) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(EfficiencyError, match="differ in shape"): recall_vs_exact(np.zeros((2, 3)), np.zeros((2, 4)))


def test_ivf_recall_is_computed_against_exact(corpus):
    images, queries = corpus
    exact = flat_index(images).search(queries, 10)[1]
    ivf = ivf_index(images, nlist=16)
    ivf.nprobe = 1
    found = ivf.search(queries, 10)[1]
    manual = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())])
    assert recall_vs_exact(found, exact) == pytest.approx(manual)
    ivf.nprobe = ivf.nlist  # every cell scanned: exact search
    assert recall_vs_exact(ivf.search(queries, 10)[1], exact) == pytest.approx(1.0)
    nprobe, recall = tune_nprobe(ivf, queries, exact, target=0.9)
    assert recall >= 0.9 and ivf.nprobe == nprobe and (nprobe == 1 or nprobe & (nprobe - 1) == 0 or nprobe == ivf.nlist)
    if nprobe > 1:  # the next smaller setting missed the target
        ivf.nprobe = nprobe // 2
        assert recall_vs_exact(ivf.search(queries, 10)[1], exact) < 0.9


def test_time_search_and_settings_errors(corpus):
    images, queries = corpus
    index = flat_index(images)
    assert time_search(lambda q: index.search(q, 10)[1], queries, 8, repeats=1) > 0
    with pytest.raises(EfficiencyError, match="at least 1"): set_faiss_threads(0)
    with pytest.raises(EfficiencyError, match="nlist must be in 1..3000"): ivf_index(images, nlist=5_000)
    with pytest.raises(EfficiencyError, match="n >= 1"): synthetic_embeddings(0, 8)


def test_synthetic_embeddings_are_unit_and_queries_find_their_source():
    images = synthetic_embeddings(1_000, 64, seed=4)
    assert images.dtype == np.float32 and np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    queries, sources = synthetic_queries(images, 50)
    assert (numpy_top_k(queries, images, 10)[0] == sources[:, None]).any(1).mean() > 0.9


# ---------------------------------------------------------------- GRACE side: identifiers

def reference_paths(n, k, c):
    "The structured-identifier recursion with even splits (np.array_split), one path of 0-based indices per image."
    paths, stack = [None] * n, [(np.arange(n), ())]
    while stack:
        rows, prefix = stack.pop()
        if prefix and len(rows) <= c:
            for j, row in enumerate(rows.tolist()): paths[row] = prefix + (j,)
            continue
        for j, group in enumerate(np.array_split(rows, min(k, len(rows)))): stack.append((group, prefix + (j,)))
    return paths


@given(st.integers(1, 2_500), st.integers(2, 40), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_structured_codes_follow_the_even_recursion(n, k, c):
    codes, lengths = structured_codes(n, k, c)
    ours = [tuple(row[:m]) for row, m in zip(codes.tolist(), lengths.tolist())]
    assert ours == reference_paths(n, k, c)
    assert (codes[:, :1] >= 0).all() and ((codes >= 0).sum(1) == lengths).all()


def test_structured_lengths_at_scale():
    for n, longest in [(1_000, 3), (27_000, 3), (1_000_000, 5)]:
        assert int(structured_codes(n)[1].max()) == longest


@pytest.mark.parametrize("kind, make", [("numeric", numeric_identifiers), ("string", string_identifiers)])
def test_number_identifiers_equal_the_real_tokenization(tokenizer, kind, make):
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    ids = synthetic_identifiers(kind, 1_200, len(tokenizer), eoc, tokenizer)
    expected = {tuple(v) for v in identifier_token_ids(make(range(1_200)), tokenizer).values()}
    assert {tuple(row[:m].tolist()) for row, m in zip(ids.tokens, ids.lengths)} == expected
    assert ids.vocab_size == len(tokenizer) and len(ids.trie(eoc)) == 1_200


def test_structured_and_atomic_vocabularies(tokenizer):
    base = len(tokenizer)
    atomic = synthetic_identifiers("atomic", 5_000, base, 0)
    assert atomic.vocab_size == base + 5_000 and atomic.max_new_tokens == 2
    assert sorted(atomic.tokens[:, 0].tolist()) == list(range(base, base + 5_000))
    structured = synthetic_identifiers("structured", 5_000, base, 0)
    assert structured.max_new_tokens == 4 and structured.vocab_size == base + 3 * 30
    assert int(structured.tokens.max()) < structured.vocab_size and len(structured.trie(0)) == 5_000
    with pytest.raises(EfficiencyError, match="need the BPE tokenizer"): synthetic_identifiers("numeric", 10, base, 0)
    with pytest.raises(EfficiencyError, match="unknown identifier kind 'semantic'"): synthetic_identifiers("semantic", 10, base, 0)


# ---------------------------------------------------------------- GRACE side: model and timer

@pytest.fixture(scope="module")
def tiny(tokenizer):
    return random_flamingo("tiny", len(tokenizer), eoc_token_id=0, media_token_id=1)


def test_last_logits_decoder_matches_flamingo_decoder(tiny, tokenizer):
    ids = synthetic_identifiers("atomic", 300, len(tokenizer), 0)
    set_vocab_size(tiny, ids.vocab_size)
    batch = prompt_batches(tokenizer, benchmark_queries(3), 3)[0]
    full, last = FlamingoDecoder(tiny, tokenizer.pad_token_id), LastLogitsDecoder(tiny, tokenizer.pad_token_id)
    torch.testing.assert_close(last.start(batch.input_ids, batch.attention_mask)[0],
                               full.start(batch.input_ids, batch.attention_mask)[0], atol=1e-4, rtol=1e-4)
    search = dict(num_beams=4, num_return=4, max_new_tokens=2, keep_unfinished=True)
    a = beam_search(full, batch.input_ids, batch.attention_mask, ids.trie(0), 0, **search)
    b = beam_search(last, batch.input_ids, batch.attention_mask, ids.trie(0), 0, **search)
    assert [[s for s, _ in r] for r in a] == [[s for s, _ in r] for r in b]


def test_set_vocab_size_keeps_embeddings_tied(tiny):
    set_vocab_size(tiny, 4_321)
    lang = tiny.lang_encoder
    assert lang.get_output_embeddings().weight is lang.get_input_embeddings().weight
    assert lang.get_input_embeddings().weight.shape == (4_321, 128) and lang.config.vocab_size == 4_321


def test_time_grace_returns_ms_per_query(tiny, tokenizer):
    ids = synthetic_identifiers("structured", 2_000, len(tokenizer), 0)
    set_vocab_size(tiny, ids.vocab_size)
    batches = prompt_batches(tokenizer, benchmark_queries(6), 3)
    assert [tuple(b.input_ids.shape)[0] for b in batches] == [3, 3]
    ms = time_grace(LastLogitsDecoder(tiny, tokenizer.pad_token_id), batches, ids.trie(0), 0, ids.max_new_tokens, num_beams=4, repeats=1)
    assert isinstance(ms, float) and 0 < ms < 60_000


def test_crossover_interpolates_in_log_size():
    status, n = crossover([1_000, 10_000, 100_000], [5.0, 5.0, 5.0], [1.0, 2.5, 10.0])
    assert status == "crosses" and 10_000 < n < 100_000
    assert n == pytest.approx(math.exp(math.log(1e4) + math.log(10) * math.log(2) / (math.log(2) + math.log(2))))
    assert crossover([1, 2], [1.0, 1.0], [0.5, 0.9]) == ("no crossover", None)
    assert crossover([1, 2], [1.0, 1.0], [1.5, 0.9]) == ("clip slower at all sizes", None)


def test_run_efficiency_rejects_bad_settings():
    with pytest.raises(EfficiencyError, match="unknown identifier kinds"): run_efficiency((100, 200), kinds=("semantic",))
    with pytest.raises(EfficiencyError, match="unknown backbone"): run_efficiency((100, 200), backbone="gpt5")
    with pytest.raises(EfficiencyError, match="sizes must be"): run_efficiency((1,))
    assert issubclass(EfficiencyError, GraceError)


def test_benchmark_script_smoke(capsys):
    spec = importlib.util.spec_from_file_location("efficiency_bench", ROOT/"benchmarks"/"efficiency.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    run = bench.main(["--quick", "--sizes", "200,2000", "--kinds", "structured,atomic", "--faiss-threads", "1", "--no-prefill-all"])
    out = capsys.readouterr().out
    assert "## Throughput: ms per query" in out and "## Flat latency" in out and "faiss IVF" in out
    assert run.sizes() == [200, 2_000] and run.methods("GRACE") == ["structured", "atomic"]


@pytest.mark.slow
def test_mpt1b_backbone_wiring(tokenizer):
    "The MPT-1B-sized backbone, cut to one layer: OpenFlamingo-3B's widths, a beam search runs on it."
    model = random_flamingo("mpt1b", 50_280 + 100, layers=1)
    assert model.lang_encoder.config.d_model == 2048 and model.vis_dim == 1024
    assert all(block is not None for block in model.lang_encoder.gated_cross_attn_layers)  # every layer, as OpenFlamingo-3B
    ids = synthetic_identifiers("atomic", 100, 50_280, 0)
    batch = prompt_batches(tokenizer, benchmark_queries(2), 2)[0]
    found = beam_search(LastLogitsDecoder(model, tokenizer.pad_token_id), batch.input_ids, batch.attention_mask, ids.trie(0), 0,
                        num_beams=2, num_return=2, max_new_tokens=2)
    assert all(seq[-1] == 0 and 50_280 <= seq[0] < 50_380 for r in found for seq, _ in r)


def test_median_pass_ms_warms_up_once_and_takes_the_median():
    calls = []
    ms = median_pass_ms(calls.append, ["a", "b"], repeats=3, per=2)
    assert calls == ["a"] + ["a", "b"] * 3 and ms >= 0
