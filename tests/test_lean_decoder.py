"""The lean decoder against the reference decoder: log-probs, rankings through `retrieve` and on memorize (image)
prompts, on tutorial-shaped Flamingos (4 layers of 128, cross-attention every second layer) after a short training,
for structured and atomic identifiers; rows in unequal blocks; the fallback for unsupported language models."""
import numpy as np
import pytest
import torch

from grace_nb.backbone import grow_vocabulary, load_flamingo, write_tiny_preset
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import (DEFAULT_RETRIEVE_PROMPT, FlamingoDecoder, InferenceError, LeanDecoder, beam_search,
                                corpus_trie, lean_supported, make_decoder, retrieve, same_ranking)
from grace_nb.training import (MEMORIZE_PROMPT, PROMPT_TEXTS, TrainConfig, cache_features, memorize_examples,
                               retrieve_examples, train_grace)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "Per identifier kind: a tutorial-shaped tiny Flamingo trained 40 steps on 48 images, its ids, features, queries."
    tmp = tmp_path_factory.mktemp("lean")
    ds = load_karpathy(write_shapes_corpus(tmp/"data", n_train=48, n_val=0, n_test=0, seed=4, progress=False),
                       progress=False)
    tok = train_bpe_tokenizer([c for r in ds.records for c in r.captions] + list(PROMPT_TEXTS), vocab_size=500)
    preset = write_tiny_preset(tmp/"preset", tok)  # the tutorial's shape: d_model 128, 4 layers, 2 heads
    image_ids = [r.image_id for r in ds.records]
    out = {}
    for kind in ("structured", "atomic"):
        extra = dict(embeddings=np.random.default_rng(0).normal(size=(48, 16)), k=4, c=4) if kind == "structured" else {}
        identifier_map = build_identifiers(kind, image_ids, **extra)
        flamingo = load_flamingo(preset); grow_vocabulary(flamingo, identifier_map)
        ids = identifier_token_ids(identifier_map, flamingo.tokenizer)
        cache = cache_features(flamingo, ds, ds.records, progress=False)
        config = TrainConfig(train_steps=40, memorize_batch_size=16, retrieve_batch_size=16, lr=3e-3, warmup_steps=4)
        train_grace(flamingo, memorize_examples(flamingo.tokenizer, ids, image_ids),
                    retrieve_examples(flamingo.tokenizer, ids, ds.queries("train")), cache, config, progress=False)
        flamingo.model.eval()
        out[kind] = (flamingo, ids, cache, [r.captions[1] for r in ds.records])
    return out


@pytest.mark.parametrize("kind", ["structured", "atomic"])
def test_retrieve_lean_equals_plain(trained, kind):
    flamingo, ids, _, queries = trained[kind]
    plain = retrieve(flamingo, queries, ids, decoder="plain", batch_size=16, progress=False)
    lean = retrieve(flamingo, queries, ids, batch_size=16, progress=False)
    single = [retrieve(flamingo, [q], ids, progress=False)[0] for q in queries[:6]]
    for a, b in zip(plain, lean):
        assert a.image_ids == b.image_ids or same_ranking([list(zip(a.identifiers, a.scores))],
                                                          [list(zip(b.identifiers, b.scores))], atol=1e-4)
        assert np.allclose(a.scores, b.scores, atol=1e-4)
    for a, b in zip(plain, single): assert np.allclose(a.scores, b.scores, atol=1e-4)


@pytest.mark.parametrize("kind", ["structured", "atomic"])
def test_memorize_prompts_lean_equals_plain(trained, kind):
    flamingo, ids, cache, _ = trained[kind]
    tok, model = flamingo.tokenizer, flamingo.model
    eoc = tok.convert_tokens_to_ids("<|endofchunk|>")
    prompt = torch.tensor([tok(MEMORIZE_PROMPT, add_special_tokens=False).input_ids] * 12)
    features, trie = cache(list(ids)[:12]), corpus_trie(ids, eoc)
    search = dict(num_beams=10, num_return=10, max_new_tokens=max(map(len, ids.values())), features=features)
    found = {name: beam_search(d, prompt, torch.ones_like(prompt), trie, eoc, **search)
             for name, d in (("plain", FlamingoDecoder(model, 0)), ("lean", LeanDecoder(model, 0)))}
    assert same_ranking(found["plain"], found["lean"], atol=1e-4)


def test_rows_in_unequal_blocks_and_fallback(trained):
    flamingo, *_ = trained["structured"]
    tok, model = flamingo.tokenizer, flamingo.model
    batch = tok([DEFAULT_RETRIEVE_PROMPT.format(query=q) for q in ("a red circle", "two small blue squares")],
                padding=True, padding_side="left", return_tensors="pt")
    decoders = FlamingoDecoder(model, 0), LeanDecoder(model, 0)
    states = [d.start(batch.input_ids, batch.attention_mask)[1] for d in decoders]
    for rows, tokens in ((torch.tensor([0, 0, 0, 1]), torch.tensor([5, 6, 7, 8])),  # 3 + 1 rows
                         (torch.tensor([3, 1, 2]), torch.tensor([9, 9, 9])),  # prompts out of order
                         (torch.tensor([0, 0, 2]), torch.tensor([4, 4, 4]))):
        (a, states[0]), (b, states[1]) = [d.advance(s, rows, tokens) for d, s in zip(decoders, states)]
        assert (a - b).abs().max() < 1e-4
    assert lean_supported(model) and isinstance(make_decoder(model, 0), LeanDecoder)
    assert type(make_decoder(model, 0, "plain")) is FlamingoDecoder
    with pytest.raises(InferenceError, match="'lean' or 'plain'"): make_decoder(model, 0, "fast")
    model.lang_encoder.transformer.blocks[0].decoder_layer.attn.Wqkv.bias = torch.nn.Parameter(torch.zeros(384))
    try:
        assert not lean_supported(model) and type(make_decoder(model, 0)) is FlamingoDecoder
        with pytest.raises(InferenceError, match="LeanDecoder needs"): LeanDecoder(model, 0)
    finally: model.lang_encoder.transformer.blocks[0].decoder_layer.attn.Wqkv.bias = None
