"Cross-cutting and property tests of `grace_nb.identifiers` (fast: the whole file runs in seconds)."
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.datasets import make_blobs

from grace_nb.core import GraceError
from grace_nb.identifiers import _KINDS
from grace_nb.identifiers import (IdentifierError, IdentifierMap, MissingImageError, add_identifier_tokens,
                                  atomic_identifiers, build_identifiers, identifier_token_ids, numeric_identifiers,
                                  semantic_identifiers, string_identifiers, structured_identifiers, token_stats,
                                  identifier_kind, identifier_kinds, register_identifier_kind, train_bpe_tokenizer)


BUILT_IN = ("numeric", "string", "semantic", "structured", "atomic")  # the kinds 02_identifiers registers


@pytest.fixture(scope="module")
def tokenizer_texts():
    return ["a red circle at the top", "two blue squares", "a green star in the middle"] * 10 + [str(n) for n in range(500)]


@pytest.fixture()
def tokenizer(tokenizer_texts):
    return train_bpe_tokenizer(tokenizer_texts, vocab_size=400)


@pytest.fixture(scope="module")
def blobs():
    embeddings, labels = make_blobs(n_samples=120, centers=3, n_features=8, random_state=1)
    return list(range(500, 620)), embeddings, labels


def _unique(m): return len(set(m.identifiers.values())) == len(m)


# --- uniqueness, determinism ---------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, 10**6), min_size=1, max_size=60), st.integers(0, 2**31))
def test_numeric_string_atomic_unique(ids, seed):
    ids = sorted(ids)
    for m in (numeric_identifiers(ids, seed), string_identifiers(ids, seed), atomic_identifiers(ids)):
        assert _unique(m) and set(m.identifiers) == set(ids) and m.collisions() == {}
    numbers = sorted(int(s) for s in string_identifiers(ids, seed).identifiers.values())
    assert numbers == list(range(1, len(ids) + 1))


def test_numeric_and_string_share_the_shuffle():
    ids = list(range(0, 300, 3))
    num, string = numeric_identifiers(ids, seed=7), string_identifiers(ids, seed=7)
    assert all(num[i] == " ".join(string[i]) for i in ids)
    assert num.params == string.params == {"seed": 7}


def test_seeded_determinism_and_sensitivity(blobs):
    ids, emb, _ = blobs
    assert string_identifiers(ids, 3) == string_identifiers(ids, 3)
    assert string_identifiers(ids, 3).identifiers != string_identifiers(ids, 4).identifiers
    s1 = structured_identifiers(ids, emb, k=3, c=10, seed=0)
    assert s1 == structured_identifiers(ids, emb, k=3, c=10, seed=0)
    unstructured = np.random.default_rng(0).normal(size=(150, 8))  # no clear clusters: the k-means seed matters
    r0, r1 = (structured_identifiers(range(150), unstructured, k=4, c=10, seed=s) for s in (0, 1))
    assert r0.identifiers != r1.identifiers and _unique(r0) and _unique(r1)


def test_order_of_input_matters_for_shuffle_but_result_is_sorted():
    m = string_identifiers([9, 3, 5], seed=0)
    assert list(m.identifiers) == [3, 5, 9]


# --- semantic ------------------------------------------------------------------------------------------------------

def test_semantic_collisions_counted_not_hidden():
    captions = {1: "A dog runs.", 2: "A  dog runs.", 3: "A cat.", 4: "a cat.", 5: "a bird"}
    m = semantic_identifiers(captions)
    assert len(m) == 5
    assert m.collisions() == {"a dog runs.": [1, 2], "a cat.": [3, 4]}
    assert m.images_for("a dog runs.") == [1, 2] and m.images_for("a fish") == []
    assert m.collision_summary() == dict(images=5, distinct_identifiers=3, colliding_identifiers=2,
                                         images_in_collisions=4, collision_rate=0.8)
    assert "2 collisions" in repr(m)
    cased = semantic_identifiers(captions, lowercase=False)
    assert cased.collisions() == {"A dog runs.": [1, 2]}


def test_semantic_bad_captions():
    with pytest.raises(IdentifierError, match="image 2: caption is empty"): semantic_identifiers({1: "x", 2: " \n"})
    with pytest.raises(IdentifierError, match="image 1: caption must be a string"): semantic_identifiers({1: ["a", "b"]})


# --- structured ----------------------------------------------------------------------------------------------------

def _paths(m): return [tuple(s.split()) for s in m.identifiers.values()]


def test_structured_tree_shape(blobs):
    ids, emb, labels = blobs
    k, c = 3, 7
    m = structured_identifiers(ids, emb, k=k, c=c, seed=0)
    assert _unique(m)
    paths = _paths(m)
    assert max(len(p) for p in paths) > 2  # recursed below the first level
    leaves = Counter(p[:-1] for p in paths)
    assert max(leaves.values()) <= c  # every leaf holds at most c images
    for p in paths:
        for level, token in enumerate(p, start=1):
            assert token.startswith(f"C_{level}_")
    children = Counter()
    for p in paths:
        for d in range(len(p) - 1): children[p[:d]] = max(children[p[:d]], int(p[d].split("_")[2]))
    assert max(children.values()) <= k  # at most k clusters per split
    # prefix-free: no identifier is a proper prefix of another
    pathset = set(paths)
    assert not any(p[:d] in pathset for p in paths for d in range(1, len(p)))
    # new tokens are exactly the tokens used
    assert set(m.new_tokens) == {t for p in paths for t in p}
    # similar embeddings share the first token (3 well separated blobs, k = 3)
    first = [m[i].split()[0] for i in ids]
    assert all(len({f for f, b in zip(first, labels) if b == label}) == 1 for label in set(labels))


def test_structured_degenerate_inputs_terminate():
    same = structured_identifiers(range(200), np.zeros((200, 4)), k=2, c=3, seed=0)
    assert _unique(same) and len(same) == 200
    one = structured_identifiers([7], np.ones((1, 3)), k=30, c=30)
    assert one[7] == "C_1_1 C_2_1"
    few = structured_identifiers([1, 2, 3], np.eye(3), k=30, c=30)
    assert _unique(few) and all(len(s.split()) == 2 for s in few.identifiers.values())
    dup_rows = np.repeat(np.eye(2), 40, axis=0)  # two distinct points, many copies
    assert _unique(structured_identifiers(range(80), dup_rows, k=5, c=4))


def test_structured_bad_input():
    with pytest.raises(IdentifierError, match="N = 2 images"): structured_identifiers([1, 2], np.ones((3, 2)))
    emb = np.ones((2, 2)); emb[1, 0] = np.nan
    with pytest.raises(IdentifierError, match="image 9"): structured_identifiers([8, 9], emb)
    with pytest.raises(IdentifierError, match="k must be"): structured_identifiers([1, 2], np.eye(2), k=1)
    with pytest.raises(IdentifierError, match="c must be"): structured_identifiers([1, 2], np.eye(2), c=0)


# --- empty / duplicate input and the dispatcher ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", BUILT_IN)
def test_empty_and_duplicate_input(kind):
    with pytest.raises(IdentifierError, match="no image ids"):
        build_identifiers(kind, [], captions={}, embeddings=np.zeros((0, 2)))
    with pytest.raises(IdentifierError, match=r"duplicate image ids: \[3\]"):
        build_identifiers(kind, [3, 4, 3], captions={3: "a", 4: "b"}, embeddings=np.eye(3))


def test_empty_direct_builders():
    for build in (numeric_identifiers, string_identifiers, atomic_identifiers):
        with pytest.raises(IdentifierError, match="no image ids"): build([])
    with pytest.raises(IdentifierError, match="no image ids"): semantic_identifiers({})
    with pytest.raises(IdentifierError, match="no image ids"): structured_identifiers([], np.zeros((0, 3)))


def test_dispatcher_names_missing_input():
    with pytest.raises(IdentifierError, match="captions"): build_identifiers("semantic", [1])
    with pytest.raises(IdentifierError, match="embeddings"): build_identifiers("structured", [1])
    with pytest.raises(IdentifierError, match="registered kinds: numeric, string, semantic, structured, atomic"):
        build_identifiers("visual", [1])
    assert isinstance(build_identifiers("atomic", [1]), IdentifierMap)


def test_registry_plugs_in_a_kind_and_forgets_it():
    assert identifier_kinds()[:5] == BUILT_IN
    assert (identifier_kind("semantic").unique, identifier_kind("structured").new_tokens) == (False, True)
    register_identifier_kind("letters", new_tokens=False, builder=lambda ids, **_: IdentifierMap("letters", {i: "abc"[n] for n, i in enumerate(ids)}))
    try: assert build_identifiers("letters", [5, 6]).identifiers == {5: "a", 6: "b"}
    finally: _KINDS.pop("letters")
    with pytest.raises(IdentifierError, match="unknown identifier kind 'letters'"): IdentifierMap("letters", {1: "a"})


def test_identifiers_does_not_import_vq_and_the_pipeline_registers_it():
    "02 knows nothing of 11: without grace_nb.vq, vq is unknown (and the error says how to get it); the main job imports it."
    import subprocess, sys
    code = """import sys
from grace_nb.identifiers import IdentifierError, build_identifiers, identifier_kinds
assert "grace_nb.vq" not in sys.modules and "vq" not in identifier_kinds()
try: build_identifiers("vq", [1, 2])
except IdentifierError as e: assert "vq registers when grace_nb.vq is imported" in str(e), e
else: raise AssertionError("vq built without grace_nb.vq")
import grace_nb.pipeline
assert identifier_kinds()[-1] == "vq"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- the map -------------------------------------------------------------------------------------------------------

def test_map_protocol_and_subset(blobs):
    ids, emb, _ = blobs
    m = structured_identifiers(ids, emb, k=3, c=7, seed=0)
    sub = m.subset(ids[:10])
    assert len(sub) == 10 and sub.new_tokens == m.new_tokens and sub.params == m.params
    assert all(sub[i] == m[i] for i in ids[:10])
    with pytest.raises(MissingImageError, match="e.g. \\[9999\\]"): m.subset([ids[0], 9999])
    with pytest.raises(KeyError): m[9999]
    assert 9999 not in m and ids[0] in m
    assert m.images_for(m[ids[3]]) == [ids[3]]


def test_map_validation():
    with pytest.raises(IdentifierError, match="images 1 and 2 share"): IdentifierMap("numeric", {1: "3", 2: "3"})
    with pytest.raises(IdentifierError, match="token 'C_9_9'"): IdentifierMap("structured", {1: "C_9_9"}, ["C_1_1"])
    with pytest.raises(IdentifierError, match="add no tokens"): IdentifierMap("string", {1: "1"}, ["I_1"])
    with pytest.raises(IdentifierError, match="image 1: identifier"): IdentifierMap("string", {1: ""})
    with pytest.raises(IdentifierError, match="unknown identifier kind"): IdentifierMap("visual", {1: "a"})
    assert issubclass(IdentifierError, GraceError) and issubclass(IdentifierError, ValueError)


# --- save / load ---------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, blobs):
    ids, emb, _ = blobs
    captions = {i: f"caption {i % 7}" for i in ids}
    for kind in BUILT_IN:
        m = build_identifiers(kind, ids, captions=captions, embeddings=emb, k=3, c=7, seed=5)
        back = IdentifierMap.load(m.save(tmp_path / f"{kind}.json"))
        assert back == m and all(isinstance(i, int) for i in back.identifiers)
        assert back.collisions() == m.collisions()
    data = json.loads((tmp_path / "structured.json").read_text())
    assert data["version"] == 1 and data["params"] == {"k": 3, "c": 7, "seed": 5, "n_init": 3, "normalize": True}


def _write(tmp_path, obj, name="m.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


GOOD = {"format": "grace_nb.identifier_map", "version": 1, "kind": "atomic", "params": {},
        "new_tokens": ["I_1", "I_2"], "identifiers": {"1": "I_1", "2": "I_2"}}


@pytest.mark.parametrize("change, message", [
    ({"format": "something"}, "not a grace_nb identifier map"),
    ({"version": 99}, "unsupported format version 99"),
    ({"kind": "visual"}, "unknown identifier kind 'visual'"),
    ({"identifiers": ["I_1"]}, "'identifiers' missing or not a dict"),
    ({"new_tokens": None}, "'new_tokens' missing or not a list"),
    ({"identifiers": {"one": "I_1"}}, "key 'one' is not an integer image id"),
    ({"identifiers": {"1": "I_1", "2": "I_1"}}, "images 1 and 2 share 'I_1'"),
    ({"identifiers": {"1": "I_1", "2": "I_3"}}, "token 'I_3'"),
    ({"identifiers": {"1": 5}}, "image 1: identifier must be a non-empty string"),
])
def test_malformed_files(tmp_path, change, message):
    p = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(IdentifierError, match=message) as e: IdentifierMap.load(p)
    assert str(p) in str(e.value)


def test_unreadable_files(tmp_path):
    assert len(IdentifierMap.load(_write(tmp_path, GOOD))) == 2
    with pytest.raises(IdentifierError, match="not valid JSON"): IdentifierMap.load(_write(tmp_path, "{oops"))
    with pytest.raises(IdentifierError, match="not found"): IdentifierMap.load(tmp_path / "absent.json")
    with pytest.raises(IdentifierError, match="not a grace_nb identifier map"): IdentifierMap.load(_write(tmp_path, "[1, 2]"))


# --- tokenizer -----------------------------------------------------------------------------------------------------

def test_numeric_one_token_per_digit(tokenizer):
    ids = list(range(1, 1201))
    m = numeric_identifiers(ids, seed=0)
    token_ids = identifier_token_ids(m, tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    for i in ids:
        assert len(token_ids[i]) == len(m[i].split()) + 1 and token_ids[i][-1] == end
    stats = token_stats(m, token_ids)
    assert stats["max_tokens"] == 4 and stats["distinct_tokens"] == 19


def test_string_identifiers_use_multi_digit_tokens(tokenizer):
    m = string_identifiers(range(1, 501), seed=0)
    stats = token_stats(m, identifier_token_ids(m, tokenizer))
    assert stats["mean_tokens"] < token_stats(numeric_identifiers(range(1, 501), 0),
                                              identifier_token_ids(numeric_identifiers(range(1, 501), 0), tokenizer))["mean_tokens"]


def test_new_tokens_added_whole_and_mismatch_error(tokenizer, blobs):
    ids, emb, _ = blobs
    m = structured_identifiers(ids, emb, k=3, c=7, seed=0)
    with pytest.raises(IdentifierError, match="lacks .* e.g. 'C_1_1'"): identifier_token_ids(m, tokenizer)
    assert add_identifier_tokens(tokenizer, m) == len(m.new_tokens)
    assert add_identifier_tokens(tokenizer, m) == 0
    token_ids = identifier_token_ids(m, tokenizer)
    for i in ids[:20]:
        assert tokenizer.convert_ids_to_tokens(token_ids[i][:-1]) == m[i].split()
        assert tokenizer(m[i], add_special_tokens=False)["input_ids"] == token_ids[i][:-1]  # text form agrees
    atomic = atomic_identifiers(ids)
    with pytest.raises(IdentifierError, match=f"'I_{ids[0]}'"): identifier_token_ids(atomic, tokenizer)
    add_identifier_tokens(tokenizer, atomic)
    assert all(len(v) == 2 for v in identifier_token_ids(atomic, tokenizer).values())


def test_tokenizer_round_trip_keeps_identifier_tokens(tmp_path, tokenizer):
    from transformers import AutoTokenizer
    m = atomic_identifiers([3, 4])
    add_identifier_tokens(tokenizer, m)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert identifier_token_ids(m, again) == identifier_token_ids(m, tokenizer)
    assert again.pad_token == "<PAD>"


def test_identifier_token_id_errors(tokenizer):
    with pytest.raises(IdentifierError, match="end token '</s>'"):
        identifier_token_ids(numeric_identifiers([1]), tokenizer, end_token="</s>")
    with pytest.raises(IdentifierError, match="image 2.*special token"):
        identifier_token_ids(semantic_identifiers({1: "a dog", 2: "a <image> cat"}), tokenizer)


def test_train_bpe_tokenizer_inputs(tokenizer):
    for d in "0123456789":
        assert d in tokenizer.get_vocab() and "Ġ" + d in tokenizer.get_vocab()
    assert tokenizer.pad_token == "<PAD>" and set(tokenizer.all_special_tokens) == {"<PAD>", "<|endofchunk|>", "<image>"}
    assert tokenizer.decode(tokenizer("any text: ünïcode ✓")["input_ids"]) == "any text: ünïcode ✓"
    with pytest.raises(IdentifierError, match="at least one"): train_bpe_tokenizer([])
    with pytest.raises(IdentifierError, match="training text 1 is a int"): train_bpe_tokenizer(["a", 3])
    with pytest.raises(IdentifierError, match="pad token"): train_bpe_tokenizer(["a"], pad_token="<pad>")
