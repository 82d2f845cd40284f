"Beyond retrieval: questions from scene graphs, attribute reading, prompts, generation, and the ipywidgets demo driven headlessly."
import html

import numpy as np
import pytest
import torch

from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.beyond import (FORMS, NOT_TUNED_NOTE, BeyondError, Question, answer_questions, attribute_scores,
                             beyond_experiment, dataset_questions, describe_images, grace_app, instruction_examples,
                             instruction_tune, majority_answers, prompt_ids, qa_accuracy, scene_questions)
from grace_nb.data import (POSITION_WORDS, caption_attributes, caption_scene, load_karpathy, sample_scene,
                           scene_graph_attributes, write_shapes_corpus)
from grace_nb.evaluation import EvaluationError, load_grace_model, save_grace_model
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.training import PROMPT_TEXTS, TrainConfig, cache_features

torch.set_num_threads(1)


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_questions_have_the_scene_graph_answers():
    for scene in _scenes(300):
        objs = scene["objects"]
        for q in scene_questions(scene, 1):
            if q.kind == "count": assert q.answer == ["one", "two", "three"][len(objs) - 1]
            elif q.kind == "background": assert q.answer == scene["background"]
            elif q.kind == "color":
                match = [o for o in objs if q.question == f"what color is the {o['shape']}?"]
                assert len(match) == 1 and match[0]["color"] == q.answer  # asked only when the shape is unique
            elif q.kind == "shape":
                cell = next(c for c, ps in POSITION_WORDS.items() if q.question == f"what shape is {ps[0]}?")
                assert [o["shape"] for o in objs if (o["row"], o["col"]) == cell] == [q.answer]
            elif q.kind == "size":
                assert [o["size"] for o in objs if q.question == f"is the {o['color']} {o['shape']} large or small?"] == [q.answer]
            elif q.kind == "leftmost":
                left = min(o["col"] for o in objs)
                assert [o["shape"] for o in objs if o["col"] == left] == [q.answer]
            else: pytest.fail(f"unknown kind {q.kind}")


def test_gold_captions_are_read_without_false_attributes():
    for i, scene in enumerate(_scenes(300, seed=1)):
        truth = scene_graph_attributes(scene)
        for caption in caption_scene(scene, np.random.default_rng(i), 5):
            said = caption_attributes(caption)
            assert said <= truth, (caption, said - truth)
            assert any(k == "shape" for k, _ in said), caption  # every caption names a shape


def test_a_complete_description_scores_full_recall(tmp_path):
    ds = load_karpathy(write_shapes_corpus(tmp_path, n_train=0, n_val=0, n_test=20, seed=5, progress=False), progress=False)
    counts = {1: "one shape", 2: "two shapes", 3: "three shapes"}
    full = {}
    for r in ds.records:
        s = r.scene
        parts = [f"a {o['size']} {o['color']} {o['shape']} {POSITION_WORDS[(o['row'], o['col'])][0]}" for o in s["objects"]]
        full[r.image_id] = f"{counts[len(s['objects'])]}: {' and '.join(parts)} on a {s['background']} background"
    scores = attribute_scores(full, ds)
    assert all(v == {"precision": 100.0, "recall": 100.0} for v in scores.values()), scores
    wrong = attribute_scores({i: "a small pink heart" for i in full}, ds)
    assert wrong["all"]["precision"] < 100 and wrong["all"]["recall"] < 30


def test_accuracy_and_majority_prior():
    train = [Question(1, "size", "is the red star large or small?", a) for a in ("large", "large", "small")]
    test = [Question(2, "size", "is the red star large or small?", "small"), Question(3, "count", "how many shapes are there?", "two")]
    assert majority_answers(train, test) == ["large", ""]
    assert qa_accuracy(test, ["small", "Two "]) == {"all": 100.0, "count": 100.0, "size": 100.0, "n_questions": 2}
    assert qa_accuracy(test, majority_answers(train, test))["all"] == 0.0
    with pytest.raises(BeyondError, match="no questions"): qa_accuracy([], [])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("beyond")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=10, n_val=0, n_test=6, seed=2, progress=False), progress=False)
    tok = train_bpe_tokenizer([c for r in ds.split("train") for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))
    f = load_flamingo(preset)
    imap = build_identifiers("atomic", [r.image_id for r in ds.records])
    grow_vocabulary(f, imap)
    test = ds.split("test")
    folder = save_grace_model(tmp/"m", f, imap, [r.image_id for r in test], {r.image_id: str(r.path) for r in test})
    tuned = save_grace_model(tmp/"tuned", f, imap, [r.image_id for r in test], {r.image_id: str(r.path) for r in test},
                             extra={"instructions": ["memorize", "retrieve", "describe", "qa"]})
    return dict(tmp=tmp, ds=ds, flamingo=f, imap=imap, folder=folder, tuned=tuned,
                token_ids=identifier_token_ids(imap, f.tokenizer), features=cache_features(f, ds, ds.records, progress=False))


def test_prompts_and_examples(tiny):
    f, token_ids = tiny["flamingo"], tiny["token_ids"]
    ids = prompt_ids(f.tokenizer, "describe", "identifier", token_ids[3][:-1])
    assert f.tokenizer.convert_ids_to_tokens(ids).count("I_3") == 1
    with pytest.raises(BeyondError, match="forms"): prompt_ids(f.tokenizer, "describe", "photo")
    qs = dataset_questions(tiny["ds"], "train")
    ex = instruction_examples(f.tokenizer, token_ids, qs[:4], [(0, "a red star")])
    eoc = f.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    assert len(ex) == 5 * len(FORMS) and all(e.target_ids[-1] == eoc for e in ex)
    image_token = f.tokenizer.convert_tokens_to_ids("<image>")
    assert all(e.has_image == (image_token in e.prompt_ids) for e in ex)
    with pytest.raises(BeyondError, match="has no identifier"): instruction_examples(f.tokenizer, {}, qs[:1])


def test_generation_in_every_form_and_a_tuning_step(tiny):
    f, token_ids, ds = tiny["flamingo"], tiny["token_ids"], tiny["ds"]
    qs = dataset_questions(ds, "test")[:5]
    for form in FORMS: assert len(answer_questions(f, token_ids, qs, form, tiny["features"])) == 5
    with pytest.raises(BeyondError, match="FeatureCache"): answer_questions(f, token_ids, qs, "image")
    texts = describe_images(f, token_ids, [r.image_id for r in ds.split("test")][:2], "image", tiny["features"], num_beams=2, max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts.values())
    before = f.model.lang_encoder.get_input_embeddings().weight.detach().clone()
    config = TrainConfig(train_steps=2, memorize_batch_size=4, retrieve_batch_size=8, warmup_steps=1, log_every=1)
    result = instruction_tune(f, token_ids, ds, tiny["features"], config, progress=False)
    assert len(result.history) == 2 and {"memorize", "retrieve"} <= set(result.history[0])
    assert not torch.equal(before, f.model.lang_encoder.get_input_embeddings().weight)


def test_app_search_toggles_and_describe(tiny):
    app = grace_app(tiny["folder"], top_k=3)
    app.search_button.click()
    assert app.status.value == "type a query first" and app.rows == [] and app.describe_button.disabled
    app.beams.value = 4
    app.query.value = tiny["ds"].split("test")[0].captions[0]  # observed: typing runs the search
    assert len(app.rows) == 3 and len(app.results.children) == 3
    assert all(r["image_id"] in app.model.retrieval_ids and r["identifier"] == f"I_{r['image_id']}" for r in app.rows)
    assert [r["rank"] for r in app.rows] == [1, 2, 3] and app.rows[0]["score"] >= app.rows[-1]["score"]
    assert "constrained, 4 beams" in app.status.value and not app.describe_button.disabled
    app.mode.value, app.beams.value = "unconstrained", 2
    app.search_button.click()
    assert "unconstrained, 2 beams" in app.status.value and len(app.rows) <= 2
    app.mode.value = "constrained"; app.search_button.click()
    app.choice.value = app.choice.options[-1][1]
    app.describe_button.click()
    chosen = app.rows[-1]["image_id"]
    assert NOT_TUNED_NOTE in app.description.value and f"image {chosen}" in app.description.value


def test_app_knows_a_describe_tuned_model_and_snapshots(tiny):
    app = grace_app(load_grace_model(tiny["tuned"]), top_k=2)
    assert app.can_describe and not grace_app(tiny["folder"]).can_describe
    app.query.value = "a red circle"
    app.choice.value = app.choice.options[0][1]
    text = app.describe()
    assert NOT_TUNED_NOTE not in app.description.value and html.escape(text) in app.description.value
    png = tiny["tmp"]/"snap.png"
    fig = app.snapshot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(fig.axes) == 2


def test_beyond_experiment_tunes_a_copy_scores_and_caches(tiny):
    "The saved start is left as it was; the tuned model is saved as describe-tuned; scores cover every form; resume reads row.json."
    ds, out = tiny["ds"], tiny["tmp"]/"experiment"
    start = load_grace_model(tiny["folder"]).flamingo.model.state_dict()
    config = TrainConfig(train_steps=2, memorize_batch_size=4, retrieve_batch_size=8, warmup_steps=1, log_every=1, lr=1e-2)
    row = beyond_experiment(tiny["folder"], ds, tiny["features"], config, out, num_beams=2, num_return=2)
    after_start = load_grace_model(tiny["folder"]).flamingo.model.state_dict()
    assert all(torch.equal(start[k], after_start[k]) for k in start)  # the start folder is read, never trained in place
    tuned = load_grace_model(out/"model")
    assert grace_app(tuned).can_describe
    assert any(not torch.equal(start[k], v) for k, v in tuned.flamingo.model.state_dict().items())
    train_q, test_q = dataset_questions(ds, "train"), dataset_questions(ds, "test")
    assert row["qa"]["majority"] == qa_accuracy(test_q, majority_answers(train_q, test_q))
    assert set(row["qa"]) == {*FORMS, "majority"} and set(row["describe"]) == {*FORMS, "gold caption"}
    assert all(r["n_questions"] == len(test_q) for r in row["qa"].values())
    assert row["steps"] == 2 and set(row["recall_before"]) == set(row["recall_after"]) == {"R@1", "R@5", "R@10"}
    assert row["start_pseudo_queries"] is None  # the tiny start records no pseudo-queries
    assert beyond_experiment(tiny["tmp"]/"no-such-model", ds, tiny["features"], config, out, resume=True) == row
    with pytest.raises(EvaluationError, match="does not exist"): beyond_experiment(tiny["tmp"]/"no-such-model", ds, tiny["features"], config, tiny["tmp"]/"fresh")
