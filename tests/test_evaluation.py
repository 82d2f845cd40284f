"Recall@K of generated identifiers (against a brute-force count) and the GRACE model folder's checks."
import random, shutil

import pytest
import torch
from safetensors.torch import save_file

from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.evaluation import (EvaluationError, evaluate_grace, grace_recall, load_grace_model, ranked_images,
                                 save_grace_model, table1_markdown)
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import Ranked, corpus_trie
from grace_nb.training import PROMPT_TEXTS

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
