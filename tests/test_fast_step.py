"The fast training step against the plain one: loss and every gradient, for each identifier type and under DeepSpeed."
from dataclasses import replace

import numpy as np
import pytest
import torch

from grace_nb.backbone import grow_vocabulary, load_flamingo, tiny_lm_config, write_tiny_preset
from grace_nb.checkpoints import _trainable_state, deepspeed_config_path
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.training import (PROMPT_TEXTS, TrainConfig, TrainingError, cache_features, collate, fast_step_supported,
                               fast_training_step, length_groups, memorize_examples, retrieve_examples, train_grace,
                               training_step)

torch.set_num_threads(1)
KINDS = ["numeric", "string", "semantic", "structured", "atomic"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=20, n_val=0, n_test=4, seed=3, progress=False),
                       progress=False)
    tok = train_bpe_tokenizer([c for r in ds.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    preset = write_tiny_preset(tmp/"preset", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2))
    return ds, preset


def build(corpus, kind):
    "A fresh tiny Flamingo grown with `kind` identifiers, its examples and cached features."
    ds, preset = corpus
    image_ids = [r.image_id for r in ds.records]
    extra = dict(captions={r.image_id: r.captions[0] for r in ds.records}) if kind == "semantic" else {}
    if kind == "structured": extra = dict(embeddings=np.random.default_rng(0).normal(size=(len(image_ids), 8)), k=3, c=3)
    imap = build_identifiers(kind, image_ids, **extra)
    flamingo = load_flamingo(preset); grow_vocabulary(flamingo, imap)
    ids = identifier_token_ids(imap, flamingo.tokenizer)
    mem = memorize_examples(flamingo.tokenizer, ids, image_ids)
    ret = retrieve_examples(flamingo.tokenizer, ids, ds.queries("train"))
    return flamingo, mem, ret, cache_features(flamingo, ds, ds.records, progress=False)


def gradients(step_fn, model, *batches):
    model.zero_grad(set_to_none=True)
    loss, parts = step_fn(model, *batches)
    loss.backward()
    return float(loss.detach()), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_steps(model, *batches):
    """Same loss (relative 1e-5), same parameters with a gradient, the whole gradient within relative 1e-5 and each
    parameter's within 1e-4 (a scalar gate's gradient is a sum with cancellation: its own rounding is larger)."""
    loss, parts, grads = gradients(training_step, model, *batches)
    fast_loss, fast_parts, fast_grads = gradients(fast_training_step, model, *batches)
    assert abs(fast_loss - loss) <= 1e-5 * abs(loss)
    assert parts.keys() == fast_parts.keys()
    assert set(grads) == set(fast_grads)
    whole = torch.cat([g.flatten() for g in grads.values()])
    assert (torch.cat([fast_grads[n].flatten() for n in grads]) - whole).norm() <= 1e-5 * whole.norm()
    for name, g in grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-4 * max(g.norm(), 1e-12), name


@pytest.mark.parametrize("kind", KINDS)
def test_fast_step_equals_plain_step(corpus, kind):
    flamingo, mem, ret, cache = build(corpus, kind)
    pad, model = flamingo.tokenizer.pad_token_id, flamingo.model.train()
    memorize = collate(mem[:6], pad) | {"features": cache([e.image_id for e in mem[:6]])}
    retrieve = collate(ret[:13], pad)  # 13 rows: unequal length groups
    assert_equal_steps(model, memorize, retrieve, {"memorize": 0.7, "retrieve": 1.3})
    assert_equal_steps(model, None, retrieve)  # retrieve only: zero gradients on the skipped attention, as plain
    assert_equal_steps(model, memorize, None)


def test_fast_step_needs_a_batch_and_groups(corpus):
    flamingo, *_ = build(corpus, "atomic")
    assert fast_step_supported(flamingo.model)
    with pytest.raises(TrainingError, match="needs a memorize or a retrieve"): fast_training_step(flamingo.model, None, None)
    with pytest.raises(TrainingError, match="at least 1"): length_groups(torch.ones(3, 4), 0)
    assert [len(g) for g in length_groups(torch.ones(3, 4), 8)] == [1, 1, 1]


def weights(flamingo): return _trainable_state(flamingo.model)


@pytest.mark.parametrize("config", [None, "zero0_cpu.json", "zero1_cpu.json"])
def test_fast_training_reaches_the_plain_weights(corpus, config):
    "Six optimizer steps with each step function, plain PyTorch or DeepSpeed: the same history and weights."
    cfg = TrainConfig(train_steps=6, memorize_batch_size=4, retrieve_batch_size=8, warmup_steps=2, lr=1e-3,
                      log_every=1, deepspeed_config=config and str(deepspeed_config_path(config)))
    runs = {}
    for fast in (False, True):
        flamingo, mem, ret, cache = build(corpus, "structured")
        runs[fast] = (flamingo, train_grace(flamingo, mem, ret, cache, replace(cfg, fast_step=fast), progress=False))
    plain, fast = runs[False], runs[True]
    for a, b in zip(plain[1].history, fast[1].history):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    for (name, x), y in zip(weights(plain[0]).items(), weights(fast[0]).values()):
        assert (x - y).abs().max() < 1e-4, name
