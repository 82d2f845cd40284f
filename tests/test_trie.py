"""Property and error tests of grace_nb.trie: the flat TensorTrie must answer exactly as the dict PrefixTrie."""
import importlib.util, random, sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from grace_nb.core import GraceError
from grace_nb.trie import PrefixTrie, TensorTrie, TrieError

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def identifier_sets(draw):
    "A prefix-free set of identifiers: random bodies (shared prefixes are likely on small vocabularies) + an end token."
    vocab = draw(st.integers(2, 40))
    end = draw(st.sampled_from([vocab - 1, 0]))  # the end token is the largest or the smallest id
    body_tokens = st.integers(0, vocab - 1).filter(lambda t: t != end)
    bodies = draw(st.lists(st.lists(body_tokens, max_size=6), min_size=1, max_size=30, unique_by=tuple))
    return [body + [end] for body in bodies], vocab, end


@st.composite
def probes(draw, ids, vocab):
    "Prefixes of every kind: empty, on the trie, whole identifiers, past the end, off the trie, out-of-vocab tokens."
    def one():
        seq = draw(st.sampled_from(ids))
        kind = draw(st.sampled_from(["empty", "on", "whole", "past", "off", "oov"]))
        if kind == "empty": return []
        if kind == "on": return seq[:draw(st.integers(0, len(seq) - 1))]
        if kind == "whole": return list(seq)
        if kind == "past": return seq + [draw(st.integers(0, vocab))]
        if kind == "oov": return seq[:draw(st.integers(0, len(seq) - 1))] + [vocab + draw(st.integers(0, 3))]
        return draw(st.lists(st.integers(0, vocab), max_size=7))
    return [one() for _ in range(draw(st.integers(1, 12)))]


def _rows(mask): return [row.nonzero().flatten().tolist() for row in mask]


@FAST
@given(st.data())
def test_tensor_trie_equals_prefix_trie(data):
    ids, vocab, end = data.draw(identifier_sets())
    plain, flat = PrefixTrie(ids), TensorTrie.build(ids, end_token=end)
    assert len(flat) == len(plain) == len(ids)
    prefixes = data.draw(probes(ids, vocab))
    states = flat.walk(prefixes)
    assert ((states >= 0).tolist() == [plain._node(p) is not None for p in prefixes])
    assert flat.is_finished(states).tolist() == [plain.is_finished(p) for p in prefixes]
    assert flat.num_children(states).tolist() == [len(plain.allowed(p)) for p in prefixes]
    expected = [plain.allowed(p) for p in prefixes]
    assert _rows(flat.allowed_mask(states, vocab + 4)) == expected
    tokens, valid, children = flat.allowed_tokens(states, return_states=True)
    assert [t[v].tolist() for t, v in zip(tokens, valid)] == expected
    assert tokens.shape[1] == max(len(e) for e in expected)
    # the child states returned with the tokens are exactly what `step` gives
    for k in range(tokens.shape[1]):
        stepped = flat.step(states, tokens[:, k])
        assert torch.equal(torch.where(valid[:, k], stepped, -1), children[:, k])
    rows, pair_tokens, _ = flat.allowed_pairs(states)
    assert [pair_tokens[rows == r].tolist() for r in range(len(prefixes))] == expected
    # one step with an arbitrary token (allowed, not allowed, out of vocabulary, negative)
    next_tokens = data.draw(st.lists(st.integers(-2, vocab + 2), min_size=len(prefixes), max_size=len(prefixes)))
    stepped = flat.step(states, torch.tensor(next_tokens))
    extended = [p + [t] if t >= 0 else None for p, t in zip(prefixes, next_tokens)]
    assert (stepped >= 0).tolist() == [e is not None and plain._node(e) is not None for e in extended]
    assert all(s in plain for s in ids) and not any(s[:-1] in plain for s in ids)


@FAST
@given(st.data())
def test_build_is_order_and_format_independent(data):
    ids, vocab, end = data.draw(identifier_sets())
    flat = TensorTrie.build(ids)
    shuffled = data.draw(st.permutations(ids))
    width = max(map(len, ids)) + data.draw(st.integers(0, 2))
    padded = torch.full((len(ids), width), 7777)  # garbage after each row's end must be ignored
    for i, s in enumerate(shuffled): padded[i, :len(s)] = torch.tensor(s)
    again = TensorTrie.build(padded, lengths=[len(s) for s in shuffled])
    for key, value in flat.state_dict().items(): assert torch.equal(value, again.state_dict()[key]), key
    assert flat.nbytes == 16 * flat.num_nodes


def test_walk_and_step_edge_cases():
    trie = TensorTrie.build([[1, 2, 9], [1, 3, 9], [4, 9]], end_token=9)
    assert trie.walk([]).shape == (0,) and trie.allowed_tokens(trie.walk([]))[0].shape == (0, 0)
    states = trie.walk([[], [1], [1, 2, 9], [5], [1, 2, 9, 9]])
    assert states[0] == trie.root and (states[3:] == -1).all() and trie.is_finished(states).tolist() == [0, 0, 1, 0, 0]
    assert trie.step(torch.tensor([-1, -1]), torch.tensor([1, 4])).tolist() == [-1, -1]  # dead stays dead
    assert trie.step(torch.tensor([0, 0]), torch.tensor([10**6, -5])).tolist() == [-1, -1]  # no aliasing of big ids
    # a finished row and an off-trie row have an all-False mask row; others are right
    mask = trie.allowed_mask(states, 12)
    assert _rows(mask) == [[1, 4], [2, 3], [], [], []]
    buf = torch.ones(5, 12, dtype=torch.bool)
    assert trie.allowed_mask(states, 12, out=buf) is buf and torch.equal(buf, mask)
    assert trie.walk(torch.tensor([[1, 3, 0]]), lengths=[2]).tolist() == trie.walk([[1, 3]]).tolist()


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    ids = [[random.Random(i).randrange(50), random.Random(i + 1).randrange(50), i, 99] for i in range(200)]
    trie = TensorTrie.build(ids, end_token=99)
    save_file(trie.state_dict(), tmp_path / "trie.safetensors")
    loaded = TensorTrie.from_state_dict(load_file(tmp_path / "trie.safetensors"))
    assert (len(loaded), loaded.num_nodes, loaded.key_base, loaded.end_token) == (200, trie.num_nodes, 200, 99)
    prefixes = [s[:k] for s in ids[:50] for k in range(5)]
    assert torch.equal(loaded.walk(prefixes), trie.walk(prefixes))
    no_end = TensorTrie.from_state_dict(TensorTrie.build([[1, 2]]).state_dict())
    assert no_end.end_token is None and "1 identifiers" in repr(no_end)
    assert loaded.to("cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    ids = [[i % 7, i % 11, i, 500] for i in range(300)]
    cpu, gpu = TensorTrie.build(ids), TensorTrie.build(ids, device="cuda")
    prefixes = [s[:k] for s in ids for k in range(5)]
    assert gpu.device.type == "cuda" and torch.equal(cpu.walk(prefixes), gpu.walk(prefixes).cpu())
    assert torch.equal(cpu.allowed_mask(cpu.walk(prefixes), 501), gpu.allowed_mask(gpu.walk(prefixes), 501).cpu())


@pytest.mark.parametrize("ids, message", [
    ([], "no identifiers"),
    ([[1, 9], []], "identifier 1 is empty"),
    ([[1, 9], [2, -1, 9]], "identifier 1 has a negative token id: [2, -1, 9]"),
    ([[1, 9], [2, 9], [1, 9]], "duplicate identifiers: identifier 0 [1, 9] and identifier 2 [1, 9]"),
    ([[1, 2, 3], [1, 2]], "identifier is a prefix of another: identifier 1 [1, 2] and identifier 0 [1, 2, 3]"),
    ([[1, "x"]], "int token ids"),
])
def test_build_errors_name_the_identifier(ids, message):
    with pytest.raises(TrieError, match=None) as info: TensorTrie.build(ids)
    assert message in str(info.value) and isinstance(info.value, (GraceError, ValueError))
    if ids and all(isinstance(t, int) for s in ids for t in s) and message != "no identifiers" and "empty" not in message:
        with pytest.raises(TrieError): PrefixTrie(ids)  # the oracle refuses the same sets


def test_other_errors():
    with pytest.raises(TrieError, match="identifier 1 does not end with the end token 9: \\[2, 3\\]"):
        TensorTrie.build([[1, 9], [2, 3]], end_token=9)
    with pytest.raises(TrieError, match="integer tensor"): TensorTrie.build(torch.zeros(3, 2))
    with pytest.raises(TrieError, match="length 5 outside 0..2"): TensorTrie.build(torch.zeros(2, 2, dtype=torch.long), lengths=[1, 5])
    with pytest.raises(TrieError, match="lengths must have shape"): TensorTrie.build(torch.zeros(2, 2, dtype=torch.long), lengths=[1])
    trie = TensorTrie.build([[1, 2], [3, 4]])
    with pytest.raises(TrieError, match="vocab_size 4 is smaller"): trie.allowed_mask(trie.walk([[]]), 4)
    with pytest.raises(TrieError, match="out must be a bool tensor"): trie.allowed_mask(trie.walk([[]]), 5, out=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TrieError, match="missing key_base"): TensorTrie.from_state_dict({k: v for k, v in trie.state_dict().items() if k != "key_base"})
    bad = trie.state_dict() | {"edge_keys": trie.edge_keys[:-1]}
    with pytest.raises(TrieError, match="inconsistent"): TensorTrie.from_state_dict(bad)
    wide = TensorTrie.build([[i, 99] for i in range(50)])
    with pytest.raises(TrieError, match="use allowed_pairs"): wide.allowed_tokens(torch.zeros(4, dtype=torch.long), max_entries=100)
    assert len(wide.allowed_pairs(torch.zeros(4, dtype=torch.long))[0]) == 200
    with pytest.raises(TrieError, match="duplicate identifier \\[3, 4\\]"): PrefixTrie([[3, 4], [3, 4]])
    with pytest.raises(TrieError, match="negative"): PrefixTrie([[3, -4]])


def test_benchmark_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location("trie_benchmark", ROOT / "benchmarks" / "trie.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "step @800 rows" in out and "| build" in out and "scaling" in out
