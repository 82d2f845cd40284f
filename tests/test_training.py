"GRACE training: examples and labels, data order, checkpoints and exact resume, DeepSpeed on one CPU, clear errors."
import json, math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.checkpoints import (DeepSpeedConfigError, _trainable_state, deepspeed_config_path, latest_checkpoint,
                                  load_deepspeed_config)
from grace_nb.training import (PROMPT_TEXTS, TrainConfig, TrainingError, batch_indices, cache_features, collate,
                               memorize_examples, retrieve_examples, train_grace, training_step)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=12, n_val=0, n_test=4, seed=2, progress=False), progress=False)
    tok = train_bpe_tokenizer([c for r in ds.split("train") for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))
    imap = build_identifiers("atomic", [r.image_id for r in ds.records])
    def fresh():
        f = load_flamingo(preset); grow_vocabulary(f, imap); return f
    f = fresh()
    ids = identifier_token_ids(imap, f.tokenizer)
    mem = memorize_examples(f.tokenizer, ids, [r.image_id for r in ds.records])
    ret = retrieve_examples(f.tokenizer, ids, ds.queries("train"))
    return dict(tmp=tmp, ds=ds, fresh=fresh, ids=ids, mem=mem, ret=ret, cache=cache_features(f, ds, ds.records, progress=False))


CFG = TrainConfig(train_steps=6, memorize_batch_size=4, retrieve_batch_size=4, warmup_steps=2, checkpoint_every=2, lr=1e-3)


def weights_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(_trainable_state(a.model).values(), _trainable_state(b.model).values()))


def test_labels_cover_only_identifier_and_end_token(setup):
    e = setup["ret"][0]
    batch = collate([e, setup["ret"][1]], pad_token_id=2)
    labels = batch["labels"][0]
    n = len(e.prompt_ids)
    assert (labels[:n] == -100).all()
    assert labels[n:n + len(e.target_ids)].tolist() == e.target_ids
    assert e.target_ids[-1] == setup["fresh"]().tokenizer.convert_tokens_to_ids("<|endofchunk|>")


def test_loss_ignores_prompt_tokens_of_the_target(setup):
    "Changing only the identifier changes the loss; the loss equals the mean NLL of identifier tokens computed by hand."
    f = setup["fresh"](); model = f.model.eval()
    batch = collate(setup["ret"][:3], f.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, _ = training_step(model, None, batch)
        from grace_nb.backbone import flamingo_forward
        logits = flamingo_forward(model, batch["input_ids"], batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    manual = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert math.isclose(float(loss), float(manual), rel_tol=1e-5)


def test_batch_indices_cover_each_epoch():
    for n, b in [(10, 3), (7, 7), (5, 8)]:
        seen = [i for s in range(math.ceil(n / min(b, n))) for i in batch_indices(n, b, s, seed=1)][:n]
        assert sorted(seen) == list(range(n))
    assert (batch_indices(10, 3, 4, 0, task=0) != batch_indices(10, 3, 4, 0, task=1)).any()


def test_resume_reaches_the_same_weights(setup):
    tmp = setup["tmp"]
    whole = setup["fresh"](); train_grace(whole, setup["mem"], setup["ret"], setup["cache"], CFG, progress=False)
    first = setup["fresh"](); train_grace(first, setup["mem"], setup["ret"], setup["cache"], replace(CFG, train_steps=6),
                                          out=tmp/"run", progress=False)
    assert latest_checkpoint(tmp/"run"/"checkpoints").name == "step_000006"
    for s in (4, 6): __import__("shutil").rmtree(tmp/"run"/"checkpoints"/f"step_{s:06d}")
    again = setup["fresh"]()
    res = train_grace(again, setup["mem"], setup["ret"], setup["cache"], CFG, out=tmp/"run", resume=True, progress=False)
    assert res.resumed_from == 2
    assert weights_diff(whole, again) < 1e-6
    assert weights_diff(whole, first) < 1e-6
    state = json.loads((tmp/"run"/"checkpoints"/"step_000006"/"state.json").read_text())
    assert state["step"] == 6 and "param_groups" in state["optimizer"]


@pytest.mark.parametrize("config", ["zero0_cpu.json", "zero1_cpu.json"])
def test_deepspeed_on_one_cpu_matches_plain_pytorch(setup, config):
    plain = setup["fresh"](); train_grace(plain, setup["mem"], setup["ret"], setup["cache"], replace(CFG, checkpoint_every=0), progress=False)
    ds = setup["fresh"]()
    cfg = replace(CFG, checkpoint_every=0, deepspeed_config=str(deepspeed_config_path(config)))
    result = train_grace(ds, setup["mem"], setup["ret"], setup["cache"], cfg, progress=False)
    assert result.steps == 6
    assert weights_diff(plain, ds) < 1e-4


def test_bad_deepspeed_config_is_named(tmp_path):
    bad = tmp_path/"ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimisation": {"stage": 2}}))
    with pytest.raises(DeepSpeedConfigError, match="zero_optimisation"): load_deepspeed_config(bad)
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 7}}))
    with pytest.raises(DeepSpeedConfigError, match="stage must be 0-3"): load_deepspeed_config(bad)
    with pytest.raises(DeepSpeedConfigError, match="no DeepSpeed config"): deepspeed_config_path("zero9.json")


def test_clear_errors(setup):
    f = setup["fresh"]()
    with pytest.raises(TrainingError, match="no identifier"): memorize_examples(f.tokenizer, {}, [0])
    with pytest.raises(TrainingError, match="empty"): retrieve_examples(f.tokenizer, setup["ids"], [("  ", 0)])
    with pytest.raises(TrainingError, match="need a FeatureCache"): train_grace(f, setup["mem"], [], None, CFG, progress=False)
    with pytest.raises(TrainingError, match="no cached vision features"): setup["cache"]([10_000])
    with pytest.raises(TrainingError, match="resume=True needs"): train_grace(f, [], setup["ret"], None, CFG, resume=True, progress=False)


def test_too_long_example_is_refused(setup):
    f = setup["fresh"]()
    long = retrieve_examples(f.tokenizer, setup["ids"], [("cross " * 400, 0)])
    with pytest.raises(TrainingError, match="more than the language model"): train_grace(f, [], long, None, CFG, progress=False)


def test_profile_settings():
    from grace_nb.core import load_profile
    cfg = TrainConfig.from_profile(load_profile("flickr30k"))
    assert (cfg.lr, cfg.warmup_steps, cfg.train_steps, cfg.memorize_batch_size, cfg.retrieve_batch_size) == (1e-4, 500, 15625, 16, 48)
    assert cfg.deepspeed_config.endswith("zero2_bf16.json") and Path(cfg.deepspeed_config).is_file()
