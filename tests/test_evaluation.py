"Recall@K of generated identifiers (against a brute-force count) and the GRACE model folder's checks."
import itertools, random, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.data import (ImageRecord, KarpathyDataset, caption_attributes, caption_scene, load_karpathy,
                           scene_graph_attributes, write_shapes_corpus)
from grace_nb.evaluation import (EvaluationError, GraceModel, ambiguity_ceiling, collapse_report, consistent_counts,
                                 evaluate_grace, findings, grace_recall, load_grace_model, memorization_accuracy,
                                 memorize_rankings, ranked_images, save_grace_model, split_memorization)
from grace_nb.tables import table1_markdown
from grace_nb.identifiers import IdentifierMap, build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import FlamingoDecoder, Ranked, corpus_trie, exhaustive_scores, exhaustive_top, same_ranking
from grace_nb.training import MEMORIZE_PROMPT, PROMPT_TEXTS, cache_features

torch.set_num_threads(1)


def brute_recall(results, gold, k):
    "Walk each query's generated sequences in order, counting ranks one image (or invalid sequence) at a time."
    hits = 0
    for r, g in zip(results, gold):
        slots = [image for images in r.images_per_identifier for image in (images or [None])]
        hits += any(image == g for image in slots[:k])
    return 100 * hits / len(gold)


def test_grace_recall_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        results, gold = [], []
        for _ in range(rng.randint(1, 12)):
            per = [rng.choice([[], [rng.randint(0, 9)], [rng.randint(0, 9), rng.randint(10, 19)]]) for _ in range(rng.randint(0, 6))]
            flat = [i for images in per for i in images]
            results.append(Ranked(flat, [[0]] * len(per), [0.0] * len(per), per, invalid=sum(not p for p in per)))
            gold.append(rng.randint(0, 19))
        metrics = grace_recall(results, gold, ks=(1, 2, 5))
        for k in (1, 2, 5): assert metrics[f"R@{k}"] == pytest.approx(brute_recall(results, gold, k))
        assert metrics["n_queries"] == len(gold)


def test_invalid_sequences_hold_their_rank():
    r = Ranked([4], [[1], [2]], [-1.0, -2.0], [[], [4]], invalid=1)
    assert ranked_images(r) == [None, 4]
    assert grace_recall([r], [4], ks=(1, 2))["R@1"] == 0.0
    with pytest.raises(EvaluationError): grace_recall([r], [4, 5])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=8, n_val=0, n_test=5, seed=4, progress=False), progress=False)
    tok = train_bpe_tokenizer([c for r in ds.split("train") for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))
    f = load_flamingo(preset)
    imap = build_identifiers("structured", [r.image_id for r in ds.records],
                             embeddings=torch.randn(len(ds), 8, generator=torch.Generator().manual_seed(0)).numpy(), k=3, c=3)
    grow_vocabulary(f, imap)
    test_ids = [r.image_id for r in ds.split("test")]
    folder = save_grace_model(tmp/"m", f, imap, test_ids, {r.image_id: str(r.path) for r in ds.split("test")})
    return dict(tmp=tmp, ds=ds, flamingo=f, imap=imap, folder=folder, test_ids=test_ids)


def copy_of(saved, name):
    dest = saved["tmp"]/name
    shutil.rmtree(dest, ignore_errors=True); shutil.copytree(saved["folder"], dest)
    return dest


def test_round_trip_retrieves_identically(saved):
    model = load_grace_model(saved["folder"])
    queries = saved["ds"].queries("test")
    a = evaluate_grace(model, queries, progress=False)
    from grace_nb.inference import retrieve
    direct = retrieve(saved["flamingo"], [q for q, _ in queries], identifier_token_ids(saved["imap"].subset(saved["test_ids"]), saved["flamingo"].tokenizer), progress=False)
    assert grace_recall(direct, [i for _, i in queries]) == {k: v for k, v in a.items() if k != "eval_seconds"}
    assert a["invalid"] == 0 and a["n_queries"] == 25
    assert model.image_path(saved["test_ids"][0]).endswith(".png")
    assert sorted(model.token_ids) == sorted(saved["test_ids"])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d/"model.safetensors").unlink(), "missing model.safetensors"),
    (lambda d: shutil.rmtree(d/"tokenizer"), "missing tokenizer"),
    (lambda d: (d/"config.json").write_text('{"format": "something else"}'), "not a grace_nb model config"),
])
def test_damaged_folders_are_refused(saved, damage, message):
    dest = copy_of(saved, "damaged"); damage(dest)
    with pytest.raises(EvaluationError, match=message): load_grace_model(dest)


def test_identifier_map_must_match_tokenizer(saved):
    dest = copy_of(saved, "other-map")
    other = build_identifiers("atomic", [r.image_id for r in saved["ds"].records])
    other.save(dest/"identifiers.json")
    with pytest.raises(EvaluationError, match="does not match the tokenizer"): load_grace_model(dest)


def test_trie_must_match(saved):
    dest = copy_of(saved, "other-trie")
    f = saved["flamingo"]
    ids = identifier_token_ids(saved["imap"].subset(saved["test_ids"][:2]), f.tokenizer)
    save_file(corpus_trie(ids, f.tokenizer.convert_tokens_to_ids("<|endofchunk|>")).state_dict(), str(dest/"trie.safetensors"))
    with pytest.raises(EvaluationError, match="trie.safetensors"): load_grace_model(dest)


def test_weights_must_fit(saved):
    dest = copy_of(saved, "other-weights")
    from safetensors.torch import load_file
    w = load_file(str(dest/"model.safetensors"))
    name = next(n for n in w if "wte" in n)
    w[name] = w[name][:-1].clone()
    save_file(w, str(dest/"model.safetensors"))
    with pytest.raises(EvaluationError, match="shape"): load_grace_model(dest)


def test_queries_outside_the_corpus_are_refused(saved):
    model = load_grace_model(saved["folder"])
    train_query = saved["ds"].queries("train")[:1]
    with pytest.raises(EvaluationError, match="not in the model's retrieval corpus"): evaluate_grace(model, train_query, progress=False)


def test_table1_has_paper_numbers():
    md = table1_markdown([{"method": "grace", "identifier": "atomic", "variant": "full", "R@1": 1.0, "R@5": 2.0, "R@10": 3.0,
                           "n_queries": 5}])
    assert "68.4" in md and "| GRACE | atomic | full | 1.0 | 2.0 | 3.0 | 5 |" in md


# --- the ambiguity ceiling ----------------------------------------------------------------------------------------

def toy_corpus(n=8, seed=0):
    "n distinct test images drawn from a small vocabulary (two shapes, two colours), so captions fit several images."
    rng, scenes, records = np.random.default_rng(seed), [], []
    while len(scenes) < n:
        cells = sorted(rng.choice(9, size=int(rng.integers(1, 3)), replace=False))
        scene = {"background": str(rng.choice(["white", "grey"])),
                 "objects": [{"shape": str(rng.choice(["circle", "star"])), "color": str(rng.choice(["red", "blue"])),
                              "size": str(rng.choice(["large", "small"])), "row": int(c) // 3, "col": int(c) % 3} for c in cells]}
        if scene not in scenes: scenes.append(scene)
    for i, scene in enumerate(scenes):
        captions = caption_scene(scene, np.random.default_rng([seed, i]), 5)
        records.append(ImageRecord(i, f"{i}.png", Path(f"{i}.png"), "test", captions, scene))
    return KarpathyDataset(records)


def brute_ceiling(dataset, ks):
    "Every best ranking of each query (its fitting images in every order, then the rest): the mean hit rate at each K."
    records, hits, counts = dataset.split("test"), {k: 0.0 for k in ks}, []
    for caption, gold in dataset.queries("test"):
        fit = [r.image_id for r in records if caption_attributes(caption) <= scene_graph_attributes(r.scene)]
        assert gold in fit  # the gold image always fits its own caption
        orders = list(itertools.permutations(fit))
        for k in ks: hits[k] += sum(order.index(gold) < k for order in orders) / len(orders)
        counts.append(len(fit))
    n = len(counts)
    return {f"R@{k}": 100 * hits[k] / n for k in ks}, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ambiguity_ceiling_matches_every_tie_break(seed):
    ds = toy_corpus(seed=seed)
    expected, counts = brute_ceiling(ds, ks=(1, 2, 3, 5))
    assert consistent_counts(ds) == counts and max(counts) > 1  # some captions fit several images
    got = ambiguity_ceiling(ds, ks=(1, 2, 3, 5))
    for k, v in expected.items(): assert got[k] == pytest.approx(v)
    assert got["n_queries"] == len(counts) == 40
    assert got["mean_consistent"] == pytest.approx(sum(counts) / len(counts), abs=0.005)
    assert got["median_consistent"] == float(np.median(counts))


def test_ambiguity_ceiling_on_a_generated_corpus(tmp_path):
    ds = load_karpathy(write_shapes_corpus(tmp_path, n_train=3, n_val=0, n_test=60, seed=9, progress=False), progress=False)
    c = ambiguity_ceiling(ds)
    assert c["n_queries"] == 300 and c["R@1"] < c["R@5"] < c["R@10"] <= 100
    assert c["R@1"] == pytest.approx(100 * np.mean([1 / n for n in consistent_counts(ds)]))


def test_ambiguity_ceiling_needs_scene_graphs():
    ds = KarpathyDataset([ImageRecord(0, "0.png", Path("0.png"), "test", ["a dog"])])
    with pytest.raises(EvaluationError, match="no scene graph"): ambiguity_ceiling(ds)


# --- collapse --------------------------------------------------------------------------------------------------------

def test_collapse_report_on_a_collapsed_and_a_healthy_run():
    collapsed = [Ranked([i % 3], [[5, 0], [i, 0]], [-0.1, -0.2], [[i % 3], [i]]) for i in range(10)]
    assert collapse_report(collapsed) == {"distinct_top1": 1, "top1_share": 100.0, "collapsed": True, "n_queries": 10}
    healthy = [Ranked([i], [[i, 0], [5, 0]], [-0.1, -0.2], [[i], [5]]) for i in range(10)]
    assert collapse_report(healthy) == {"distinct_top1": 10, "top1_share": 10.0, "collapsed": False, "n_queries": 10}


def test_collapse_counts_empty_results_as_none_and_uses_a_strict_threshold():
    empty = [Ranked([], [], [], [])] * 3 + [Ranked([1], [[1, 0]], [-0.1], [[1]])]
    assert collapse_report(empty) == {"distinct_top1": 2, "top1_share": 75.0, "collapsed": True, "n_queries": 4}
    half = [Ranked([1], [[1, 0]], [-0.1], [[1]])] * 2 + [Ranked([2], [[2, 0]], [-0.1], [[2]]), Ranked([3], [[3, 0]], [-0.1], [[3]])]
    assert not collapse_report(half)["collapsed"] and collapse_report(half, threshold=0.4)["collapsed"]
    with pytest.raises(EvaluationError, match="no results"): collapse_report([])


# --- memorization accuracy -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memo(saved):
    ds, f = saved["ds"], saved["flamingo"]
    return dict(features=cache_features(f, ds, ds.records, progress=False), ids=[r.image_id for r in ds.records])


def memo_model(saved, kind):
    "A GraceModel over the fixture's (untrained) Flamingo: its structured map, or a semantic map where images 0 and 1 share one."
    f, ds = saved["flamingo"], saved["ds"]
    imap = saved["imap"] if kind == "structured" else IdentifierMap(
        "semantic", {r.image_id: ds.records[0 if r.image_id == 1 else r.image_id].captions[0] for r in ds.records})
    ids = identifier_token_ids(imap, f.tokenizer)
    return GraceModel(f, imap, list(ids), ids, corpus_trie(ids, f.tokenizer.convert_tokens_to_ids("<|endofchunk|>")))


def brute_memorization(model, features, image_ids):
    "Teacher-force every distinct identifier after the memorize prompt and each image; where does the image's own one rank?"
    tok = model.flamingo.tokenizer
    own = identifier_token_ids(model.identifier_map.subset(image_ids), tok)
    candidates = [list(c) for c in dict.fromkeys(tuple(v) for v in own.values())]
    prompt = torch.tensor([tok(MEMORIZE_PROMPT, add_special_tokens=False).input_ids] * len(image_ids))
    decoder = FlamingoDecoder(model.flamingo.model.eval(), tok.pad_token_id)
    top = exhaustive_top(exhaustive_scores(decoder, prompt, torch.ones_like(prompt), candidates, features(image_ids)), candidates, 10)
    ranks = [[seq for seq, _ in t].index(own[i]) if any(seq == own[i] for seq, _ in t) else None for i, t in zip(image_ids, top)]
    pct = lambda n: 100 * n / len(ranks)
    return top, len(candidates), {"top1": pct(sum(r == 0 for r in ranks)), "top10": pct(sum(r is not None for r in ranks))}


@pytest.mark.parametrize("kind", ["structured", "semantic"])
def test_memorization_matches_exhaustive_scoring(saved, memo, kind):
    model, features, ids = memo_model(saved, kind), memo["features"], memo["ids"]
    top, n_identifiers, expected = brute_memorization(model, features, ids)
    assert n_identifiers > 10  # so the top 10 is a real cut
    found = memorize_rankings(model, features, ids, num_beams=n_identifiers, batch_size=4)  # wide enough to be exact
    assert same_ranking([found[i] for i in ids], top)
    got = memorization_accuracy(model, features, ids, num_beams=n_identifiers, batch_size=4)
    assert got["n_images"] == len(ids)
    assert got["top1"] == pytest.approx(expected["top1"], abs=0.01) and got["top10"] == pytest.approx(expected["top10"], abs=0.01)
    assert 0 < got["top10"] < 100


def test_shared_semantic_identifier_counts_for_each_image(saved, memo):
    model, features = memo_model(saved, "semantic"), memo["features"]
    found = memorize_rankings(model, features, [0, 1], corpus_ids=memo["ids"])
    own = identifier_token_ids(model.identifier_map.subset([0, 1]), model.flamingo.tokenizer)
    assert own[0] == own[1]  # one identifier for two images: each is right when it comes first for that image
    hits = [found[i][0][0] == own[i] for i in (0, 1)]
    assert memorization_accuracy(model, features, [0, 1], corpus_ids=memo["ids"])["top1"] == 100 * sum(hits) / 2


def test_memorization_restores_the_mode(saved, memo):
    model, net = memo_model(saved, "structured"), saved["flamingo"].model
    was = net.training
    try:
        for mode in (True, False):
            net.train(mode)
            memorization_accuracy(model, memo["features"], memo["ids"][:3])
            assert net.training == mode
    finally: net.train(was)


def test_split_memorization_spans_every_listed_split(saved, memo):
    model, features, ds = memo_model(saved, "structured"), memo["features"], saved["ds"]
    train, test = ([r.image_id for r in ds.split(s)] for s in ("train", "test"))
    per_split = split_memorization(model, features, ds, num_beams=13)
    assert per_split["test"] == memorization_accuracy(model, features, test, num_beams=13, corpus_ids=train + test)
    assert per_split["train"] == memorization_accuracy(model, features, train, num_beams=13, corpus_ids=train + test)
    sampled = split_memorization(model, features, ds, sample=3, seed=1)
    assert {s: r["n_images"] for s, r in sampled.items()} == {"train": 3, "test": 3}
    assert sampled == split_memorization(model, features, ds, sample=3, seed=1)  # the seed fixes the sample
    assert split_memorization(model, features, ds, sample=100) == split_memorization(model, features, ds)
    with pytest.raises(EvaluationError, match="'val' has no memorized images"): split_memorization(model, features, ds, splits=("val",))
    with pytest.raises(EvaluationError, match="not in corpus_ids"): memorization_accuracy(model, features, test, corpus_ids=train)


# --- Table 1 columns and collapsed findings -------------------------------------------------------------------------

def test_table1_without_diagnostics_is_unchanged():
    md = table1_markdown([{"method": "grace", "identifier": "numeric", "variant": "full", "R@1": 1.0, "R@5": 2.0, "R@10": 3.0,
                           "n_queries": 5}], "title")
    assert md == ("title\n\n| method | identifier | variant | R@1 | R@5 | R@10 | queries | paper R@1 | paper R@5 | paper R@10 |\n"
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
                  "| GRACE | numeric | full | 1.0 | 2.0 | 3.0 | 5 | 22.5 | 28.9 | 29.4 |")


def test_table1_ceiling_memorization_and_collapse():
    clip = {"method": "clip", "identifier": None, "variant": "trained", "R@1": 10.0, "R@5": 20.0, "R@10": 30.0, "n_queries": 5}
    good = {"method": "grace", "identifier": "atomic", "variant": "full", "R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "n_queries": 5,
            "memorization": {"train": {"top1": 80.0, "top10": 90.0}, "test": {"top1": 12.5, "top10": 50.0}},
            "collapse": {"collapsed": False, "top1_share": 20.0, "distinct_top1": 4}}
    bad = good | {"identifier": "numeric", "memorization": {"train": {"top1": 1.0}},
                  "collapse": {"collapsed": True, "top1_share": 97.5, "distinct_top1": 2}}
    ceiling = {"R@1": 45.29, "R@5": 77.45, "R@10": 89.4, "n_queries": 1500, "median_consistent": 3, "mean_consistent": 6.86}
    lines = table1_markdown([clip, good, bad], ceiling=ceiling).splitlines()
    assert lines[0].endswith("| memorized train/test (top-1 %) | collapsed |")
    assert lines[2] == "| best achievable | – | ceiling (scene graphs) | 45.3 | 77.5 | 89.4 | 1500 | – | – | – | – | – |"
    assert lines[3].endswith("| 88.1 | – | – |")
    assert lines[4].endswith("| 93.7 | 80.0 / 12.5 | no |")
    assert lines[5].endswith("| 1.0 / – | **collapsed** (top-1 share 97.5%) |")
    assert table1_markdown([clip], ceiling=ceiling).splitlines()[2].endswith("| 1500 | – | – | – |")  # no extra columns


def frow(kind, variant, r1, r10, collapsed=None, **kw):
    row = dict(method="grace", identifier=kind, variant=variant, **{"R@1": r1, "R@5": 0, "R@10": r10}, **kw)
    if collapsed is not None: row["collapse"] = {"collapsed": collapsed, "top1_share": 95.0 if collapsed else 10.0}
    return row


def run_metrics(bad=(), **extra):
    "A made-up run where the four Table 1 / Table 2 findings all hold; rows named in `bad` (kind, variant) collapsed."
    c = lambda kind, variant: (kind, variant) in bad
    runs = [dict(method="clip", identifier=None, variant="trained", **{"R@1": 10, "R@5": 0, "R@10": 40})] + [
        frow(k, "full", r1, r10, collapsed=c(k, "full"), **kw) for k, r1, r10, kw in
        [("numeric", 5, 20, {}), ("string", 9, 30, {}), ("structured", 12, 40, {}), ("atomic", 15, 45, {"atomic_init": "random"})]]
    table2 = [frow(k, v, r1, r10, collapsed=c(k, v)) for k, v, r1, r10 in
              [("numeric", "full", 5, 20), ("numeric", "w/o learning to memorize", 4, 18), ("numeric", "w/o constrained generation", 1, 5),
               ("structured", "full", 12, 40), ("structured", "w/o learning to memorize", 11, 38),
               ("structured", "w/o constrained generation", 2, 9)]]
    return dict(runs=runs, table2=table2, **extra)


FOUR = slice(0, 4)  # constrained, memorize, order, atomic


def test_findings_without_collapse_are_unchanged():
    rows = findings(run_metrics())
    assert [r["verdict"] for r in rows[FOUR]] == ["reproduced"] * 4
    assert not any("(collapsed)" in r["ours"] for r in rows)
    explicit = run_metrics()  # collapse reports that say "no" change nothing
    for r in explicit["runs"][1:] + explicit["table2"]: r["collapse"] = {"collapsed": False, "top1_share": 10.0}
    assert findings(explicit) == rows


def test_findings_resting_only_on_collapsed_rows_are_not_measured():
    every = [(r["identifier"], r["variant"]) for r in run_metrics()["runs"][1:] + run_metrics()["table2"]]
    rows = findings(run_metrics(bad=every))
    assert [r["verdict"] for r in rows[FOUR]] == ["not measured (collapsed)"] * 4
    assert all("(collapsed)" in r["ours"] for r in rows[FOUR])


def test_a_collapsed_row_never_counts_as_a_success():
    rows = findings(run_metrics(bad=[("structured", "full")]))  # Table 1 structured and Table 2 structured full
    verdicts = {r["finding"]: r["verdict"] for r in rows}
    assert verdicts["Constrained generation is essential"] == "partly"  # numeric still counts, structured does not
    assert verdicts["Learning to memorize helps a little"] == "partly"
    assert verdicts["Structured > string > numeric identifiers"] == "not measured (collapsed)"
    assert "structured 12.0 (collapsed)" in rows[2]["ours"]
    m = run_metrics(bad=[("atomic", "full")])
    m["runs"].append(frow("atomic", "full", 16, 50, collapsed=False, atomic_init="clip"))
    assert findings(m)[3]["verdict"] == "partly"  # only the CLIP-initialised atomic counts now
    assert findings(run_metrics(bad=[("atomic", "full")]))[3]["verdict"] == "not measured (collapsed)"
    assert findings(run_metrics(bad=[("numeric", "w/o learning to memorize")]))[1]["verdict"] == "partly"


def test_collapsed_free_generation_is_an_outcome_not_a_failure():
    bad = [("numeric", "w/o constrained generation"), ("structured", "w/o constrained generation")]
    row = findings(run_metrics(bad=bad))[0]
    assert row["verdict"] == "reproduced" and row["ours"].count("(collapsed)") == 2


def test_position_accuracy_matches_one_image_at_a_time(saved, memo):
    "Batched, right-padded teacher forcing gives each token's verdict that an unpadded forward of that one image gives"
    from grace_nb.backbone import flamingo_forward
    from grace_nb.memorization import position_accuracy
    import copy
    from grace_nb.training import TrainConfig, memorize_examples, retrieve_examples, train_grace
    model, features, ids = memo_model(saved, "structured"), memo["features"], memo["ids"]
    model = GraceModel(copy.deepcopy(model.flamingo), model.identifier_map, model.retrieval_ids, model.token_ids, model.trie)
    tok = model.flamingo.tokenizer
    own = identifier_token_ids(model.identifier_map.subset(ids), tok)
    # a few steps of memorizing, so that some tokens are right and some wrong (an untrained model gets none right)
    train_grace(model.flamingo, memorize_examples(tok, own, ids), retrieve_examples(tok, own, saved["ds"].queries("train")),
                features, TrainConfig(train_steps=25, memorize_batch_size=13, retrieve_batch_size=8, lr=3e-3, warmup_steps=2),
                progress=False)
    net = model.flamingo.model.eval()
    prompt = tok(MEMORIZE_PROMPT, add_special_tokens=False).input_ids
    right = []
    with torch.no_grad():
        for i in ids:
            seq = torch.tensor([prompt + list(own[i])])
            logits = flamingo_forward(net, seq, torch.ones_like(seq), features([i])).logits[0]
            right.append((logits[len(prompt) - 1:-1].argmax(-1) == torch.tensor(own[i])).tolist())
    got = position_accuracy(model, features, ids, batch_size=4)
    n = len(ids)
    expected = {f"token {k + 1}": round(100 * sum(r[k] for r in right) / n, 1) for k in range(len(right[0]) - 1)}
    expected |= {"end": round(100 * sum(r[-1] for r in right) / n, 1), "all tokens": round(100 * sum(map(all, right)) / n, 1)}
    assert got == expected
    assert got["all tokens"] <= min(v for k, v in got.items() if k != "all tokens")
    assert any(0 < v < 100 for v in got.values()), got  # the check is not a comparison of zeros
