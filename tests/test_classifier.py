"The reference code's atomic classifier head (08b_classifier_head) and how its row enters Table 1's findings."
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from grace_nb.backbone import load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.classifier import ClassifierError, ClassifierHead, classify, query_states, train_classifier
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.evaluation import _full_rows, findings, grace_recall
from grace_nb.identifiers import train_bpe_tokenizer
from grace_nb.pipeline import best_length_penalty
from grace_nb.training import PROMPT_TEXTS, TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("classifier")
    dataset = load_karpathy(write_shapes_corpus(tmp/"data", n_train=12, n_val=0, n_test=4, seed=3, progress=False), progress=False)
    tokenizer = train_bpe_tokenizer([c for r in dataset.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tokenizer, lm_config=tiny_lm_config(len(tokenizer), d_model=32, n_layers=1))
    flamingo = load_flamingo(preset, seed=0)
    ids = [r.image_id for r in dataset.records]
    head = ClassifierHead(32, nn.functional.normalize(torch.randn(len(ids), 8), dim=1), ids)
    return dataset, flamingo, head


def test_head_scores_are_projections_against_a_frozen_table():
    table = torch.randn(3, 4)
    head = ClassifierHead(6, table, [7, 8, 9])
    hidden = torch.randn(5, 6)
    torch.testing.assert_close(head(hidden), head.transform(hidden) @ table.T)
    assert "classes" not in dict(head.named_parameters())
    with pytest.raises(ClassifierError): ClassifierHead(6, table, [7, 8])
    with pytest.raises(ClassifierError): ClassifierHead(6, table, [7, 7, 9])


def test_query_state_does_not_depend_on_padding(tiny):
    dataset, flamingo, _ = tiny
    flamingo.model.eval()
    texts = [q for q, _ in dataset.queries("train")[:4]]
    with torch.no_grad():
        batch = query_states(flamingo, texts)
        alone = torch.cat([query_states(flamingo, [t]) for t in texts])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ClassifierError): query_states(flamingo, ["  "])


def test_training_lowers_the_loss_and_classify_ranks_only_the_corpus(tiny):
    dataset, flamingo, head = tiny
    frozen = head.classes.clone()
    config = TrainConfig(train_steps=30, retrieve_batch_size=8, lr=3e-3, warmup_steps=2, log_every=10)
    result = train_classifier(flamingo, head, dataset.queries("train"), config, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    torch.testing.assert_close(head.classes, frozen)  # the CLIP table never moves
    corpus = [r.image_id for r in dataset.split("test")]
    queries = dataset.queries("test")
    found = classify(flamingo, head, [q for q, _ in queries], corpus, k=3)
    assert len(found) == len(queries) and all(len(r.image_ids) == 3 and set(r.image_ids) <= set(corpus) for r in found)
    assert all(r.scores == sorted(r.scores, reverse=True) for r in found)
    assert grace_recall(found, [i for _, i in queries], ks=(3,))["R@3"] >= 0
    with pytest.raises(ClassifierError, match="not a class"): train_classifier(flamingo, head, [("a red square", 10**6)], config)
    with pytest.raises(ClassifierError, match="not classes"): classify(flamingo, head, ["a red square"], [10**6])


def _row(variant, r1, r10, **kw):
    return dict(method="grace", identifier="atomic", variant=variant, **{"R@1": r1, "R@5": 0, "R@10": r10}, **kw)


def test_the_classifier_row_is_its_own_reading_of_atomic():
    clip = dict(method="clip", identifier=None, variant="trained", **{"R@1": 10, "R@5": 0, "R@10": 40})
    tokens = _row("full, random init", 5, 30, atomic_init="random")
    head = _row("reference-code classifier head", 12, 45, head="classifier", atomic_init=None)
    atomic = {f["finding"]: f for f in findings(dict(runs=[clip, tokens, head]))}["Atomic identifiers ≥ CLIP"]
    assert atomic["verdict"] == "partly" and "classifier head" in atomic["ours"] and "random init" in atomic["ours"]
    assert _full_rows(dict(runs=[clip, tokens, head]))["atomic"] is tokens and len(_full_rows(dict(runs=[clip, tokens, head]))) == 1
    alone = {f["finding"]: f for f in findings(dict(runs=[clip, head]))}["Atomic identifiers ≥ CLIP"]
    assert alone["verdict"] == "partly"  # the classifier alone never makes the new-token claim "reproduced"


def test_best_length_penalty_skips_collapsed_types_and_prefers_the_first_on_ties():
    rows = [dict(identifier=k, length_penalty=lp, collapsed=c, **{"R@1": r}) for k, lp, c, r in
            [("a", -2.0, False, 4.0), ("a", 1.0, False, 6.0), ("b", -2.0, True, 0.0), ("b", 1.0, False, 0.0)]]
    assert best_length_penalty(rows) == 1.0
    tie = [dict(identifier="a", length_penalty=lp, collapsed=False, **{"R@1": 3.0}) for lp in (-2.0, 0.0)]
    assert best_length_penalty(tie) == -2.0
    assert best_length_penalty([r | {"collapsed": True} for r in rows]) is None
