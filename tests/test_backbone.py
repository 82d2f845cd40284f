"The Flamingo backbone: the open_flamingo adaptation, presets, cached-feature forward, vocabulary growth."
import numpy as np
import pytest
import torch

from grace_nb.backbone import (BackboneError, Preset, adapt_open_flamingo, flamingo_forward, grow_vocabulary, load_flamingo,
                               openflamingo_preset, shrunken_openflamingo_preset, tiny_lm_config, vision_features,
                               write_tiny_preset)
from grace_nb.core import load_profile
from grace_nb.identifiers import build_identifiers, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["a big green cross in the bottom left", "Predict the identifier for the"], vocab_size=400)


@pytest.fixture(scope="module")
def preset(tmp_path_factory, tokenizer):
    return write_tiny_preset(tmp_path_factory.mktemp("preset")/"tiny", tokenizer,
                             lm_config=tiny_lm_config(len(tokenizer), d_model=64, n_layers=2))


def open_gates(model):
    for block in model.lang_encoder.gated_cross_attn_layers:
        if block is not None: block.attn_gate.data.fill_(1.0); block.ff_gate.data.fill_(1.0)
    return model.eval()


def test_adaptation_is_applied_once():
    from open_flamingo.src.flamingo_lm import FlamingoLayer
    assert adapt_open_flamingo() is False
    assert FlamingoLayer.forward.__name__ == "_flamingo_layer_forward"


def test_load_is_deterministic_and_freezes_vision(preset):
    a, b = load_flamingo(preset), load_flamingo(preset)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in a.model.vision_encoder.parameters())
    assert all(p.requires_grad for p in a.model.lang_encoder.parameters())
    assert a.vocab_size == len(a.tokenizer)


def test_forward_on_features_equals_open_flamingo_forward(preset):
    f = load_flamingo(preset); model = open_gates(f.model)
    images = torch.randn(3, 3, 64, 64)
    batch = f.tokenizer(["<image>a big", "<image>green cross", "<image>a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(images[:, None, None], batch.input_ids, batch.attention_mask).logits
        ours = flamingo_forward(model, batch.input_ids, batch.attention_mask, vision_features(model, images)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_image_changes_the_output_and_text_rows_ignore_it(preset):
    f = load_flamingo(preset); model = open_gates(f.model)
    ids = f.tokenizer(["<image>a big green"], return_tensors="pt").input_ids
    text = f.tokenizer(["a big green"], return_tensors="pt").input_ids
    with torch.no_grad():
        feats = [vision_features(model, torch.randn(1, 3, 64, 64)) for _ in range(2)]
        with_image = [flamingo_forward(model, ids, features=x).logits for x in feats]
        text_only = [flamingo_forward(model, text, features=x).logits for x in feats] + [flamingo_forward(model, text).logits]
    assert (with_image[0] - with_image[1]).abs().max() > 1e-4
    torch.testing.assert_close(text_only[0], text_only[2]); torch.testing.assert_close(text_only[1], text_only[2])


def test_grow_vocabulary_adds_whole_tokens_and_resizes(preset):
    f = load_flamingo(preset)
    imap = build_identifiers("atomic", list(range(12)))
    before = f.vocab_size
    assert grow_vocabulary(f, imap) == 12 and grow_vocabulary(f, imap) == 0
    assert f.vocab_size == before + 12 == len(f.tokenizer)
    assert f.tokenizer.tokenize("I_11") == ["I_11"]
    out = f.model.lang_encoder.get_output_embeddings().weight
    assert out.data_ptr() == f.model.lang_encoder.get_input_embeddings().weight.data_ptr()  # MPT ties them


def test_grow_vocabulary_clip_init_follows_embeddings(preset):
    f = load_flamingo(preset)
    imap = build_identifiers("atomic", list(range(6)))
    rng = np.random.default_rng(0)
    emb = {i: rng.normal(size=32) for i in range(6)}
    emb[3] = emb[0] * 2  # same direction as image 0
    grow_vocabulary(f, imap, init="clip", image_embeddings=emb)
    rows = f.model.lang_encoder.get_input_embeddings().weight[-6:].detach()
    torch.testing.assert_close(rows[0], rows[3])
    with pytest.raises(BackboneError, match="init='clip' needs"):
        grow_vocabulary(load_flamingo(preset), build_identifiers("numeric", list(range(6))), init="clip", image_embeddings=emb)


def test_grown_tokenizer_rebuilds_grown_model(preset, tmp_path):
    f = load_flamingo(preset)
    grow_vocabulary(f, build_identifiers("atomic", list(range(5))))
    f.tokenizer.save_pretrained(tmp_path/"tok")
    g = load_flamingo(preset, tokenizer_path=tmp_path/"tok")
    assert g.vocab_size == f.vocab_size


def test_missing_parts_are_named(tmp_path, preset):
    with pytest.raises(BackboneError, match="no preset.json"): Preset.load(tmp_path)
    with pytest.raises(BackboneError, match="checkpoint.pt"): openflamingo_preset(load_profile("flickr30k"))
    with pytest.raises(BackboneError, match="unknown model_preset"):
        openflamingo_preset(load_profile("flickr30k").replace(model_preset="openflamingo-99b"))
    with pytest.raises(BackboneError, match="tokenizer folder"): load_flamingo(preset, tokenizer_path=tmp_path/"nope")


def test_openflamingo_3b_wiring_without_weights(tmp_path, tokenizer):
    f = load_flamingo(shrunken_openflamingo_preset(tmp_path/"of3b", tokenizer, lm_layers=1))
    assert (f.model.vis_dim, f.model.lang_dim) == (1024, 2048)
    assert len(f.model.perceiver.layers) == 6 and f.model.perceiver.latents.shape == (64, 1024)
    assert all(block is not None for block in f.model.lang_encoder.gated_cross_attn_layers)  # every layer, as 3B
    with torch.no_grad():
        feats = vision_features(f.model, torch.randn(1, 3, 224, 224))
        out = flamingo_forward(f.model, tokenizer(["<image>a big"], return_tensors="pt").input_ids, features=feats)
    assert feats.shape == (1, 256, 1024) and out.logits.shape[-1] == len(tokenizer)
