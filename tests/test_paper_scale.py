"""The paper-scale path, tested small: the shipped ZeRO-2/ZeRO-3 bf16 configs resume exactly, per-batch vision features
train like cached ones, the paper profiles' settings, OpenFlamingo-3B widths with per-batch features, the paper files'
checks, and the memory arithmetic. The full shrunken-3B training run is marked slow (--runslow)."""
import dataclasses, shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grace_nb.backbone import (BackboneError, Preset, flamingo_forward, grow_vocabulary, load_flamingo, openflamingo_preset,
                               shrunken_openflamingo_preset, tiny_lm_config, write_tiny_preset)
from grace_nb.core import load_profile
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.paper_scale import feature_cache_gb, openflamingo_parameters, paper_files, zero_memory_gb
from grace_nb.checkpoints import _trainable_state, deepspeed_config_path, load_checkpoint
from grace_nb.training import (PROMPT_TEXTS, BatchFeatures, TrainConfig, cache_features, feature_source, make_optimizer,
                               memorize_examples, retrieve_examples, train_grace)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=8, n_val=0, n_test=4, seed=7, progress=False), progress=False)
    tok = train_bpe_tokenizer([c for r in ds.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))
    imap = build_identifiers("atomic", [r.image_id for r in ds.records])
    def fresh():
        f = load_flamingo(preset); grow_vocabulary(f, imap); return f
    f = fresh(); ids = identifier_token_ids(imap, f.tokenizer)
    return dict(tmp=tmp, ds=ds, tok=tok, preset=preset, fresh=fresh, cache=cache_features(f, ds, ds.records, progress=False),
                mem=memorize_examples(f.tokenizer, ids, [r.image_id for r in ds.records]),
                ret=retrieve_examples(f.tokenizer, ids, ds.queries("train")))


CFG = TrainConfig(train_steps=4, memorize_batch_size=3, retrieve_batch_size=4, warmup_steps=1, checkpoint_every=1, lr=1e-3)


def max_diff(a, b):
    a, b = _trainable_state(a.model), _trainable_state(b.model)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("config", ["zero2_bf16.json", "zero3_bf16.json"])
def test_shipped_zero_configs_resume_exactly(tiny, tmp_path, config):
    "The paper's bf16 ZeRO-2 and ZeRO-3 configs (DeepSpeed's CPU accelerator): stopped after step 2, resumed, same weights."
    cfg = replace(CFG, deepspeed_config=str(deepspeed_config_path(config)))
    whole = tiny["fresh"](); train_grace(whole, tiny["mem"], tiny["ret"], tiny["cache"], cfg, out=tmp_path/"run", progress=False)
    for step in (3, 4): shutil.rmtree(tmp_path/"run"/"checkpoints"/f"step_{step:06d}")
    again = tiny["fresh"]()
    result = train_grace(again, tiny["mem"], tiny["ret"], tiny["cache"], cfg, out=tmp_path/"run", resume=True, progress=False)
    assert result.resumed_from == 2
    assert max_diff(whole, again) == 0.0
    plain = tiny["fresh"](); opt = make_optimizer(plain.model, 1e-3, 0.1)  # the same checkpoint opens without DeepSpeed
    state = load_checkpoint(tmp_path/"run"/"checkpoints"/"step_000004", plain.model, opt)
    assert state["step"] == 4 and max_diff(plain, again) == 0.0
    assert len(opt.state) == len(_trainable_state(plain.model))  # every parameter got its AdamW moments back


def test_batch_features_train_like_the_cache(tiny):
    cfg = replace(CFG, checkpoint_every=0)
    cached = tiny["fresh"](); train_grace(cached, tiny["mem"], tiny["ret"], tiny["cache"], cfg, progress=False)
    per_batch = tiny["fresh"]()
    features = BatchFeatures(per_batch, tiny["ds"], cache_size=4, workers=2)
    train_grace(per_batch, tiny["mem"], tiny["ret"], features, cfg, progress=False)
    assert max_diff(cached, per_batch) < 1e-5
    assert features.encoded >= 4 and len(features.cache) == 4


def test_paper_profiles_choose_per_batch_features_and_prune_checkpoints(tiny, tmp_path):
    for name in ("flickr30k", "coco"):
        prof = load_profile(name)
        assert (prof.feature_cache, TrainConfig.from_profile(prof).keep_checkpoints) == ("batch", 2)
    assert load_profile("shapes").feature_cache == "ram"
    f = tiny["fresh"]()
    assert isinstance(feature_source(f, tiny["ds"], tiny["ds"].records, load_profile("flickr30k").feature_cache), BatchFeatures)
    train_grace(f, tiny["mem"], tiny["ret"], tiny["cache"], replace(CFG, keep_checkpoints=2), out=tmp_path/"run", progress=False)
    assert sorted(p.name for p in (tmp_path/"run"/"checkpoints").iterdir()) == ["step_000003", "step_000004"]


def test_openflamingo_3b_widths_with_per_batch_features(tiny, tmp_path):
    "ViT-L/14 features computed per batch from 64-pixel shapes images (resized to 224) drive the 3B wiring's forward."
    f = load_flamingo(shrunken_openflamingo_preset(tmp_path/"of3b", tiny["tok"], lm_layers=1, vision_layers=1))
    features = feature_source(f, tiny["ds"], tiny["ds"].records, "batch", workers=1)([0, 9])
    assert features.shape == (2, 256, 1024)
    ids = tiny["tok"](["<image>Predict the identifier for the", "<image>a big"], return_tensors="pt", padding=True)
    with torch.no_grad(): out = flamingo_forward(f.model, ids.input_ids, ids.attention_mask, features=features)
    assert out.logits.shape[:2] == ids.input_ids.shape and torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_shrunken_3b_trains_and_resumes_with_the_flickr30k_settings(tiny, tmp_path):
    "The flickr30k profile's zero2_bf16.json, BatchFeatures and OpenFlamingo-3B widths: 2 steps, stop, resume, same weights."
    preset = shrunken_openflamingo_preset(tmp_path/"of3b", tiny["tok"], lm_layers=1, vision_layers=1)
    imap = build_identifiers("atomic", [r.image_id for r in tiny["ds"].records])
    def fresh():
        f = load_flamingo(preset); grow_vocabulary(f, imap); return f
    f = fresh(); ids = identifier_token_ids(imap, f.tokenizer)
    mem = memorize_examples(f.tokenizer, ids, [r.image_id for r in tiny["ds"].records])
    ret = retrieve_examples(f.tokenizer, ids, tiny["ds"].queries("train"))
    prof = load_profile("flickr30k")
    cfg = TrainConfig.from_profile(prof, train_steps=2, memorize_batch_size=2, retrieve_batch_size=2, warmup_steps=1,
                                   checkpoint_every=1)
    assert Path(cfg.deepspeed_config).name == "zero2_bf16.json"
    train_grace(f, mem, ret, feature_source(f, tiny["ds"], tiny["ds"].records, prof.feature_cache, workers=1), cfg,
                out=tmp_path/"run", progress=False)
    shutil.rmtree(tmp_path/"run"/"checkpoints"/"step_000002")
    g = fresh()
    result = train_grace(g, mem, ret, feature_source(g, tiny["ds"], tiny["ds"].records, "batch", workers=1), cfg,
                         out=tmp_path/"run", resume=True, progress=False)
    assert result.resumed_from == 1 and max_diff(f, g) == 0.0


def test_paper_files_lists_every_file_of_a_profile(tmp_path):
    rows = paper_files(load_profile("flickr30k"))
    assert [r["key"] for r in rows] == ["dataset_json", "image_root", "checkpoint_dir", "lm_path", "clip_path", "deepspeed_config"]
    assert rows[2]["path"].endswith("OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt")
    assert rows[-1]["present"] and all(r["present"] == Path(r["path"]).exists() for r in rows if r["key"] != "lm_path")


def _fake_paper_profile(tmp_path: Path, clip_file: Path):
    (tmp_path/"of"/"checkpoint.pt").parent.mkdir(parents=True); (tmp_path/"of"/"checkpoint.pt").write_bytes(b"x")
    (tmp_path/"mpt-1b-redpajama-200b").mkdir(); (tmp_path/"mpt-1b-redpajama-200b"/"config.json").write_text("{}")
    return load_profile("flickr30k").replace(checkpoint_dir=str(tmp_path/"of"), lm_path=str(tmp_path/"mpt-1b-redpajama-200b"),
                                             clip_path=str(clip_file))


class Doubler(torch.nn.Module):
    def forward(self, x): return 2 * x


def test_openai_torchscript_clip_file_is_refused_by_name(tmp_path):
    "OpenAI's ViT-L-14.pt is a TorchScript archive: refused before loading, with the file to use instead."
    jit = tmp_path/"ViT-L-14.pt"
    torch.jit.save(torch.jit.script(Doubler()), str(jit))  # (not a Linear: a ZeRO-3 run earlier in the process patches F.linear)
    with pytest.raises(BackboneError, match=r"ViT-L-14\.pt \(clip_path\) is a TorchScript archive.*open_clip_model\.safetensors"):
        openflamingo_preset(_fake_paper_profile(tmp_path, jit))
    good = tmp_path/"open_clip_model.safetensors"; good.write_bytes(b"not read here")
    (tmp_path/"b").mkdir()
    preset = openflamingo_preset(_fake_paper_profile(tmp_path/"b", good))
    assert preset.clip_model == "ViT-L-14-quickgelu"  # OpenAI's CLIP uses QuickGELU; a weights file alone does not say so


def test_a_checkpoint_without_perceiver_weights_is_not_loaded(tiny, tmp_path):
    "OpenFlamingo's checkpoint.pt is loaded with weights_only=True; one with no Perceiver weights is refused, not ignored."
    model = tiny["fresh"]().model
    good = {k: v for k, v in model.state_dict().items() if k.startswith("perceiver.")}
    for name, state in (("wrong.pt", {"encoder.weight": torch.zeros(2)}), ("right.pt", good)):
        torch.save(state, tmp_path/name)
    with_checkpoint = lambda name: Preset(**(dataclasses.asdict(tiny["preset"]) | {"flamingo_checkpoint": str(tmp_path/name)}))
    with pytest.raises(BackboneError, match="wrong.pt holds no Perceiver weights"): load_flamingo(with_checkpoint("wrong.pt"))
    loaded = load_flamingo(with_checkpoint("right.pt"), seed=123)  # another seed: the Perceiver must come from the file
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in good.items())


def test_memory_arithmetic():
    "ZeRO per-GPU bytes (Rajbhandari et al. 2020) on round numbers, and the 3B counts' consistency."
    gb = lambda stage, gpus=4: zero_memory_gb(10**9, 0, stage, gpus)["total"]
    assert [gb(s) for s in range(4)] == [16.0, 7.0, 5.5, 4.0] and gb(2, gpus=1) == 16.0
    assert zero_memory_gb(0, 10**9, 3)["total"] == 0.5  # frozen weights: 2 bytes, split only by stage 3
    assert feature_cache_gb(1000, tokens=10, width=100) == 0.0 and feature_cache_gb(10**6, tokens=256, width=1024) == 1048.6
    p = openflamingo_parameters(new_tokens=1000)
    q = openflamingo_parameters()
    assert p["embeddings"] - q["embeddings"] == 1000 * 2048 and p["trainable"] - q["trainable"] == 1000 * 2048
    assert p["vision"] == q["frozen"] == 303_966_208
