"Tutorial pretraining: a pool disjoint from the corpus, the three objectives, the cached preset, and GRACE starting from it."
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grace_nb.pipeline as pipeline
from grace_nb.backbone import load_flamingo
from grace_nb.core import load_json, load_profile
from grace_nb.data import load_karpathy, sample_scenes, write_shapes_corpus
from grace_nb.identifiers import build_identifiers
from grace_nb.pretraining import (PretrainConfig, PretrainingError, TASKS, image_hashes, pool_dir, pretrain_batch,
                                  pretrained_preset, pretraining_key, scratch_preset, task_examples, write_pretraining_pool)

torch.set_num_threads(1)
SMALL = dict(images=40, heldout=4, clip_steps=3, steps=4, batch_size=8, warmup=1, log_every=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    "A tiny pretrained preset for a 60-image corpus (seed 3), in a private cache."
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = load_karpathy(write_shapes_corpus(tmp/"corpus", n_train=40, n_val=4, n_test=16, seed=3, progress=False), progress=False)
    profile = load_profile("shapes")
    preset = pretrained_preset(PretrainConfig(**SMALL), [r.scene for r in corpus.records], cache=tmp/"cache",
                               clip=dict(batch_size=16), progress=False)
    return dict(tmp=tmp, corpus=corpus, preset=preset, profile=profile)


def test_pool_shares_no_image_with_the_corpus_by_content_hash(tmp_path):
    "Without the exclusion a 1,000-image pool repeats some corpus images; with it, none (pixels compared)."
    corpus = load_karpathy(write_shapes_corpus(tmp_path/"corpus", n_train=700, n_val=0, n_test=300, seed=0, progress=False),
                           progress=False)
    scenes = [r.scene for r in corpus.records]
    free = write_pretraining_pool(tmp_path/"free", 1000, 0, seed=7, exclude=(), progress=False)
    kept_out = write_pretraining_pool(tmp_path/"out", 1000, 0, seed=7, exclude=scenes, progress=False)
    corpus_hashes = set(image_hashes(corpus))
    assert len(set(image_hashes(free)) & corpus_hashes) > 0  # the check can fail: same scene, same pixels
    assert set(image_hashes(kept_out)) & corpus_hashes == set()
    assert len(image_hashes(kept_out)) == 1000  # and the pool's own images are distinct


def test_pool_errors():
    with pytest.raises(PretrainingError, match="at least one image"): write_pretraining_pool("/tmp/never", 0, 0)
    with pytest.raises(PretrainingError, match="unknown pretraining task"): task_examples("vqa", None, [], 2, 0, 0)


def test_objectives_take_loss_on_text_only(built):
    pool = load_karpathy(pool_dir(built["preset"].root)/"dataset_pool.json", splits=("train", "val"), progress=False)
    tok = load_flamingo(built["preset"]).tokenizer
    image = tok.convert_tokens_to_ids("<image>")
    for task in TASKS:
        examples = task_examples(task, tok, pool.split("train"), 4, step=0, seed=0)
        expected_images = {"caption": 1, "interleaved": 2, "text": 0}[task]
        assert all(len(e.image_ids) == expected_images == e.input_ids.count(image) for e in examples)
        assert all(l == -100 for e in examples for t, l in zip(e.input_ids, e.labels) if t == image)
        batch = pretrain_batch(examples, tok.pad_token_id, torch.zeros(len(pool), 2, 3), {r.image_id: i for i, r in enumerate(pool.records)})
        assert (batch["features"] is None) == (task == "text")
        if task == "interleaved": assert batch["features"].shape[:2] == (2, 2)


def test_pretraining_on_a_tiny_pool_learns_and_is_cached(built):
    preset = built["preset"]
    report = load_json(preset.root/"pretraining.json")
    history = report["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([h[t] for t in TASKS])).all() for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert report["pool"]["train"]["images"] == 40 and report["pool"]["val"]["images"] == 4
    assert preset.flamingo_checkpoint == "flamingo.safetensors" and not (preset.root/"pool").exists()
    again = pretrained_preset(PretrainConfig(**SMALL), [r.scene for r in built["corpus"].records], cache=built["tmp"]/"cache",
                              clip=dict(batch_size=16), progress=False)
    assert again.root == preset.root  # same settings, the cached build
    assert pretraining_key(dict(steps=4)) != pretraining_key(dict(steps=5))  # another setting, another folder


def test_grace_run_starts_from_the_pretrained_weights(built, monkeypatch):
    "grace_stage's model, at the moment training starts, holds exactly the preset's trained state dict."
    preset, corpus = built["preset"], built["corpus"]
    saved = load_file(str(preset.root/"flamingo.safetensors"))
    captured = {}
    class Stop(Exception): pass
    def fake_train(flamingo, *args, **kwargs):
        captured.update({k: v.detach().clone() for k, v in flamingo.model.state_dict().items()})
        raise Stop
    monkeypatch.setattr(pipeline, "train_grace", fake_train)
    imap = build_identifiers("numeric", [r.image_id for r in corpus.records])
    base = load_flamingo(preset)
    features = pipeline.cache_features(base, corpus, [r for r in corpus.records if r.split in ("train", "test")], progress=False)
    with pytest.raises(Stop):
        pipeline.grace_stage("numeric", built["profile"], preset, corpus, imap, features, built["tmp"]/"run", seed=11, progress=False)
    assert set(saved) <= set(captured)
    for name, value in saved.items():
        if captured[name].shape == value.shape: assert torch.equal(captured[name], value), name
        else: assert torch.equal(captured[name][:len(value)], value), name  # embeddings grown by the identifier tokens
    scratch = load_flamingo(scratch_preset(preset, built["tmp"]/"scratch"), seed=11)
    state = scratch.model.state_dict()
    assert not torch.equal(state["perceiver.latents"], saved["perceiver.latents"])  # the from-scratch twin is not pretrained


# --- the pool follows the corpus (pretrain_pool): shapes, the corpus's train split, another Karpathy file ---
from grace_nb.landscapes import write_landscapes_corpus
from grace_nb.pipeline import pretrain_pool
from grace_nb.pretraining import karpathy_pool, pool_provenance
from collections import Counter
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def lands(tmp_path_factory):
    "A tiny landscapes corpus, a second Karpathy file (another seed) and a profile per pool choice."
    tmp = tmp_path_factory.mktemp("lands")
    corpus_json = write_landscapes_corpus(tmp/"data", n_train=30, n_val=4, n_test=12, seed=5, progress=False)
    other_json = write_landscapes_corpus(tmp/"other", n_train=20, n_val=3, n_test=0, seed=6, progress=False)
    (tmp/"settings.ini").write_text(
        "[lands]\nextends = shapes\ncorpus = karpathy\ndata_dir = data\ndataset_json = ${data_dir}/dataset_landscapes.json\n"
        "[lands-shapes]\nextends = lands\npretrain_pool = shapes\n[lands-train]\nextends = lands\npretrain_pool = train\n"
        f"[lands-other]\nextends = lands\npretrain_pool = {other_json}\n[lands-bad]\nextends = lands\npretrain_pool = nowhere\n")
    profiles = {n: load_profile(n, tmp/"settings.ini") for n in ("lands", "lands-shapes", "lands-train", "lands-other", "lands-bad")}
    return dict(tmp=tmp, corpus=load_karpathy(corpus_json, progress=False), profiles=profiles, other=other_json)


def test_three_pool_choices(lands):
    p, corpus = lands["profiles"], lands["corpus"]
    assert pretrain_pool(load_profile("shapes")) is None and pretrain_pool(p["lands-shapes"], corpus) is None
    own, default = pretrain_pool(p["lands-train"], corpus), pretrain_pool(p["lands"], corpus)  # auto = train for Karpathy
    assert [r.image_id for r in own] == [r.image_id for r in default] == [r.image_id for r in corpus.records if r.split != "test"]
    assert own.name == "landscapes (train split)" and len(own.split("train")) == 30 and len(own.split("val")) == 4
    other = pretrain_pool(p["lands-other"], corpus)
    assert len(other.split("train")) == 20 and other.json_path == lands["other"]
    with pytest.raises(Exception, match="neither auto, shapes, train nor a Karpathy file"): pretrain_pool(p["lands-bad"], corpus)


def test_no_test_image_enters_the_pool(lands, tmp_path):
    "By pixel hash: the train-split pool and another file hold no test image of the corpus; a leaky file is refused."
    p, corpus = lands["profiles"], lands["corpus"]
    test_hashes = set(image_hashes(corpus, "test"))
    assert len(test_hashes) == 12
    for name in ("lands-train", "lands-other"):
        assert set(image_hashes(pretrain_pool(p[name], corpus))) & test_hashes == set()
    leaky = json.loads(corpus.json_path.read_text())
    for e in leaky["images"]: e["split"] = "train"
    path = corpus.json_path.parent/"leaky.json"
    path.write_text(json.dumps(leaky))
    with pytest.raises(PretrainingError, match="12 of its images are test images"): karpathy_pool(path, corpus=corpus)


def test_train_pool_tokenizer_covers_the_corpus_words(lands):
    "Pretrained on the corpus's train split, every word used 5+ times in its captions is one token; on shapes, most are not."
    corpus = lands["corpus"]
    counts = Counter(w for r in corpus.split("train") for c in r.captions for w in c.replace(",", " ").split())
    words = {w for w, n in counts.items() if n >= 5}
    assert len(words) > 40
    def pieces(pool):
        preset = pretrained_preset(PretrainConfig(**SMALL), cache=lands["tmp"]/"cache", clip=dict(batch_size=16),
                                   progress=False, pool=pool)
        tok = AutoTokenizer.from_pretrained(str(preset.resolve(preset.tokenizer_path)))
        return preset, {w: len(tok(" " + w)["input_ids"]) for w in words}
    own_preset, own = pieces(pretrain_pool(lands["profiles"]["lands-train"], corpus))
    _, shapes = pieces(None)
    assert max(own.values()) == 1, {w: n for w, n in own.items() if n > 1}
    assert sum(n > 1 for n in shapes.values()) > len(words) / 2
    provenance = load_json(own_preset.root/"pretraining.json")["pool_provenance"]
    assert provenance["images"] == 30 and provenance["source"] == "landscapes (train split)"
    assert provenance == pool_provenance(pretrain_pool(lands["profiles"]["lands-train"], corpus), "landscapes (train split)")
