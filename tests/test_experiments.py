"The experiments' pieces: caption scoring against scene graphs, free-generation outcomes, Table 2 and findings."
from types import SimpleNamespace

import pytest

from grace_nb.data import DataError, caption_attributes, load_karpathy, scene_graph_attributes, write_shapes_corpus
from grace_nb.evaluation import findings
from grace_nb.experiments import OUTCOMES, CaptionError, caption_quality, generation_outcomes, semantic_captions
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import Ranked
from grace_nb.pipeline import _run_plan, _table2_rows
from grace_nb.core import load_profile


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return load_karpathy(write_shapes_corpus(folder, n_train=60, n_val=0, n_test=40, seed=11, progress=False), progress=False)


def test_gold_captions_never_name_a_missing_attribute(corpus):
    "Every caption template, on 100 scenes: the parser finds only attributes the scene has (precision 100%)."
    for r in corpus.records:
        for caption in r.captions:
            assert caption_attributes(caption) <= scene_graph_attributes(r.scene), (caption, r.scene)


def test_caption_quality_penalises_wrong_attributes(corpus):
    test = corpus.split("test")
    wrong = {}
    for r in test:  # name a colour no object has
        missing = next(c for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
                       if ("color", c) not in scene_graph_attributes(r.scene))
        wrong[r.image_id] = [f"a {missing} heart"]
    q = caption_quality(wrong, corpus)
    assert q["attribute_precision"] < 50 and q["exact_gold_match"] == 0
    gold = caption_quality({r.image_id: r.captions[:1] for r in test}, corpus)
    assert gold["attribute_precision"] == 100.0 and gold["exact_gold_match"] == 100.0


def test_semantic_captions_never_use_a_test_caption(corpus):
    generated = {r.image_id: ["a made up caption"] for r in corpus.split("test")}
    captions = semantic_captions(corpus, generated)
    for r in corpus.records:
        assert captions[r.image_id] == ("a made up caption" if r.split == "test" else r.captions[0])
    with pytest.raises(CaptionError, match="no generated caption"):
        semantic_captions(corpus, {})


def _outcome_model(corpus, kind):
    "What `generation_outcomes` reads of a model: tokenizer, identifier map (whole corpus), retrieval ids (test)."
    tokenizer = train_bpe_tokenizer([c for r in corpus.records for c in r.captions], vocab_size=300)
    imap = build_identifiers(kind, [r.image_id for r in corpus.records])
    tokenizer.add_tokens(imap.new_tokens)
    return SimpleNamespace(identifier_map=imap, flamingo=SimpleNamespace(tokenizer=tokenizer),
                           retrieval_ids=[r.image_id for r in corpus.split("test")])


@pytest.mark.parametrize("kind", ["numeric", "atomic"])
def test_generation_outcomes_keep_never_memorized_images_apart(tmp_path, kind):
    "Validation images have identifiers but were never memorized: they get their own column, not 'memorized'."
    corpus = load_karpathy(write_shapes_corpus(tmp_path, n_train=6, n_val=3, n_test=4, seed=2, progress=False), progress=False)
    model = _outcome_model(corpus, kind)
    ids = identifier_token_ids(model.identifier_map, model.flamingo.tokenizer)
    eoc = model.flamingo.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    first = lambda split: ids[corpus.split(split)[0].image_id]
    # query 1: a validation image first, then a training image; query 2: no image first, then two test images
    results = [Ranked([], [first("val"), first("train")], [0.0] * 2, [[]] * 2),
               Ranked([], [[eoc], ids[corpus.split("test")[1].image_id], first("test")], [0.0] * 3, [[]] * 3)]
    out = generation_outcomes(model, results, corpus)
    assert out["generated"] == 5
    assert out["counts"] == {"retrieval corpus": 2, "memorized, not in corpus": 1, "never memorized": 1, "no image": 1}
    assert out["top1_counts"] == {"retrieval corpus": 0, "memorized, not in corpus": 0, "never memorized": 1, "no image": 1}
    assert out["never memorized %"] == 20.0 and out["top-1 never memorized %"] == 50.0
    assert sum(out[f"{k} %"] for k in OUTCOMES) == pytest.approx(100)
    # had the validation split been memorized too, its image would count as memorized
    wider = generation_outcomes(model, results, corpus, memorized_splits=("train", "val", "test"))
    assert wider["counts"]["never memorized"] == 0 and wider["counts"]["memorized, not in corpus"] == 2


def test_generation_outcomes_need_the_models_corpus(tmp_path):
    "A dataset that lacks the model's images is an error, not a silent 'no image'."
    corpus = load_karpathy(write_shapes_corpus(tmp_path/"a", n_train=4, n_val=2, n_test=2, seed=2, progress=False), progress=False)
    other = load_karpathy(write_shapes_corpus(tmp_path/"b", n_train=2, n_val=0, n_test=2, seed=2, progress=False), progress=False)
    with pytest.raises(DataError, match="no image with id"):
        generation_outcomes(_outcome_model(corpus, "numeric"), [], other)


def test_run_plan_and_table2_order():
    shapes = load_profile("shapes")
    plan = _run_plan(["structured"], shapes, table1=False, ablations=True)
    assert [(p["name"], p["memorize"], p["pseudo"]) for p in plan] == [
        ("structured", True, True), ("structured-no-memorize", False, True), ("structured-no-pseudo", True, False)]
    row = lambda kind, variant: dict(method="grace", identifier=kind, variant=variant)
    full = [row("numeric", "full"), row("structured", "full")]
    trained = [row("structured", "w/o pseudo-queries"), row("numeric", "w/o learning to memorize"), row("structured", "w/o learning to memorize")]
    free = [row("numeric", "w/o constrained generation"), row("structured", "w/o constrained generation")]
    table = [(r["identifier"], r["variant"]) for r in _table2_rows(full, trained, free)]
    assert table == [("numeric", "full"), ("numeric", "w/o learning to memorize"), ("numeric", "w/o constrained generation"),
                     ("structured", "full"), ("structured", "w/o learning to memorize"),
                     ("structured", "w/o constrained generation"), ("structured", "w/o pseudo-queries")]


def _r(kind, variant, r1, r10, **kw):
    return dict(method="grace", identifier=kind, variant=variant, **{"R@1": r1, "R@5": 0, "R@10": r10}, **kw)


def test_findings_can_fail():
    "Each rule says 'not reproduced' when the numbers go the other way."
    metrics = dict(
        runs=[dict(method="clip", identifier=None, variant="t", **{"R@1": 20, "R@5": 0, "R@10": 60}),
              _r("numeric", "full", 9, 40), _r("string", "full", 8, 35), _r("structured", "full", 5, 30),
              _r("atomic", "full", 12, 45, atomic_init="random")],
        table2=[_r("numeric", "full", 9, 40), _r("numeric", "w/o learning to memorize", 10, 41),
                _r("numeric", "w/o constrained generation", 9.5, 41)],
        beam_sweep=[dict(identifier="numeric", beams=b, **{"R@1": 9 + b / 10, "R@10": 40}) for b in (10, 50)],
        efficiency=dict(summary=dict(smallest=1000, largest=10**6, grace_structured_ratio=3.0, clip_exact_ratio=2.0)))
    assert [f["verdict"] for f in findings(metrics)] == ["not reproduced"] * 6
    assert [f["verdict"] for f in findings({})] == ["not measured"] * 6
