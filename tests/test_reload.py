"""Paper-scale reload, tested small. OpenFlamingo's checkpoint.pt holds the language model's embeddings at the base
vocabulary (its trainer keeps every embedding matrix); a GRACE model trained from such a preset grows the vocabulary, is
saved, and must reload (base tokenizer -> checkpoint -> grown tokenizer -> saved weights) and retrieve as before, for
structured, atomic and vq identifiers. The tutorial's flamingo.safetensors preset takes the same path."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from grace_nb.backbone import (BackboneError, grow_vocabulary, load_flamingo, openflamingo_state_dict, tiny_lm_config,
                               write_tiny_preset)
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.evaluation import evaluate_grace, grace_recall, load_grace_model, save_grace_model
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import retrieve
from grace_nb.pretraining import save_pretrained_preset
from grace_nb.checkpoints import _trainable_state
from grace_nb.training import PROMPT_TEXTS, TrainConfig, cache_features, memorize_examples, retrieve_examples, train_grace
from grace_nb.vq import vq_identifiers

torch.set_num_threads(1)
WTE, LM_HEAD = "lang_encoder.transformer.wte.weight", "lang_encoder.lm_head.weight"
CFG = TrainConfig(train_steps=3, memorize_batch_size=3, retrieve_batch_size=4, warmup_steps=1, checkpoint_every=0, lr=1e-2)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    "A shapes corpus, a tiny preset, and its model 'pretrained' (shifted weights) as OpenFlamingo and as the tutorial save it."
    tmp = tmp_path_factory.mktemp("reload")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=8, n_val=0, n_test=4, seed=7, progress=False), progress=False)
    tok = train_bpe_tokenizer([c for r in ds.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=400)
    tiny = write_tiny_preset(tmp/"parts", tok, lm_config=tiny_lm_config(len(tok), d_model=32, n_layers=2, n_heads=2))
    pretrained = load_flamingo(tiny, seed=5)  # another seed than load_flamingo's: the checkpoint must be what loads
    with torch.no_grad():
        for p in (pretrained.model.perceiver.latents, pretrained.model.lang_encoder.get_input_embeddings().weight): p.add_(0.5)
    (tmp/"of").mkdir()
    torch.save(openflamingo_state_dict(pretrained.model), tmp/"of"/"checkpoint.pt")
    # as openflamingo_preset builds one: absolute paths to the user's files, nothing to copy into a model folder
    absolute = {k: str(tiny.resolve(getattr(tiny, k))) for k in ("lm_path", "tokenizer_path", "clip_config")}
    paper = dataclasses.replace(tiny, name="openflamingo-tiny", root=tmp/"of", flamingo_checkpoint=str(tmp/"of"/"checkpoint.pt"),
                                trust_remote_code=True, **absolute)
    tutorial = save_pretrained_preset(pretrained, tmp/"tiny-pretrained", report={})
    ids = [r.image_id for r in ds.records]
    emb = torch.randn(len(ids), 16, generator=torch.Generator().manual_seed(0)).numpy()
    maps = {"structured": build_identifiers("structured", ids, embeddings=emb, k=3, c=3),
            "atomic": build_identifiers("atomic", ids), "vq": vq_identifiers(ids, emb, levels=2, codebook_size=4, seed=0)}
    return dict(tmp=tmp, ds=ds, tok=tok, pretrained=pretrained, paper=paper, tutorial=tutorial, maps=maps)


def test_the_checkpoint_holds_the_embeddings_at_the_base_vocabulary(parts):
    "What open_flamingo's trainer keeps: Perceiver, cross-attention, every embedding (tied lm_head too); no frozen LM layers."
    state = torch.load(parts["paper"].flamingo_checkpoint, weights_only=True)
    assert state[WTE].shape == state[LM_HEAD].shape == (len(parts["tok"]), 32)
    assert any(k.startswith("perceiver.") for k in state) and any(".gated_cross_attn_layer." in k for k in state)
    assert not [k for k in state if k.startswith("vision_encoder.") or "old_decoder_blocks" in k or ".decoder_layer." in k]
    loaded = load_flamingo(parts["paper"])
    assert torch.equal(loaded.model.state_dict()[WTE], state[WTE])  # loaded at its own shape, not the LM folder's rows
    assert torch.equal(loaded.model.perceiver.latents, parts["pretrained"].model.perceiver.latents)


def _train_and_save(parts, preset, kind, folder):
    f = load_flamingo(preset)
    grow_vocabulary(f, imap := parts["maps"][kind])
    assert f.vocab_size > len(parts["tok"])
    ds, token_ids = parts["ds"], identifier_token_ids(imap, f.tokenizer)
    train_grace(f, memorize_examples(f.tokenizer, token_ids, [r.image_id for r in ds.records]),
                retrieve_examples(f.tokenizer, token_ids, ds.queries("train")), cache_features(f, ds, ds.records, progress=False),
                CFG, progress=False)
    test_ids = [r.image_id for r in ds.split("test")]
    return f, test_ids, save_grace_model(folder, f, imap, test_ids)


@pytest.mark.parametrize("kind, scale", [("structured", "paper"), ("atomic", "paper"), ("vq", "paper"), ("atomic", "tutorial")])
def test_a_grown_model_reloads_and_retrieves_as_before(parts, tmp_path, kind, scale):
    f, test_ids, folder = _train_and_save(parts, parts[scale], kind, tmp_path/"model")
    if scale == "paper": assert [p.name for p in (folder/"preset").iterdir()] == ["preset.json"]  # points at the checkpoint
    model = load_grace_model(folder)
    mine, theirs = _trainable_state(f.model), _trainable_state(model.flamingo.model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert model.flamingo.tokenizer.get_vocab() == f.tokenizer.get_vocab()
    queries = parts["ds"].queries("test")
    texts, gold = [q for q, _ in queries], [i for _, i in queries]
    before = retrieve(f, texts, identifier_token_ids(parts["maps"][kind].subset(test_ids), f.tokenizer), progress=False)
    after = model.retrieve(texts, progress=False)
    for b, a in zip(before, after, strict=True):
        assert (a.image_ids, a.identifiers) == (b.image_ids, b.identifiers)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    metrics = evaluate_grace(model, queries, progress=False)
    assert {k: v for k, v in metrics.items() if k != "eval_seconds"} == grace_recall(before, gold)


def test_a_checkpoint_of_another_vocabulary_is_refused(parts, tmp_path):
    "Rows missing from the checkpoint's embeddings are an error naming the tensor, not a partial load."
    state = torch.load(parts["paper"].flamingo_checkpoint, weights_only=True)
    state[WTE] = state[LM_HEAD] = state[WTE][:-3].clone()
    torch.save(state, tmp_path/"checkpoint.pt")
    other = dataclasses.replace(parts["paper"], flamingo_checkpoint=str(tmp_path/"checkpoint.pt"))
    with pytest.raises(BackboneError, match=r"wte\.weight has shape .*build at that tokenizer"): load_flamingo(other)


def test_a_tokenizer_that_is_not_a_grown_copy_is_refused(parts, tmp_path):
    train_bpe_tokenizer(["a small blue square"] + list(PROMPT_TEXTS), vocab_size=300).save_pretrained(tmp_path/"other")
    with pytest.raises(BackboneError, match="is not a grown copy of preset 'openflamingo-tiny'"):
        load_flamingo(parts["paper"], tokenizer_path=tmp_path/"other")
