"""Smoke runs of benchmarks/train_step.py and benchmarks/query_latency.py (--quick, one thread):
each returns its result dict, ends with the same dict as one JSON line, and the fast paths agree
with the plain ones (gradients of a training step; rankings of a beam search)."""
import importlib.util, json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"train_speedup", "ms_per_step", "gflops", "matmul_peak_gflops", "max_rel_grad_diff",
              "threads", "quick"}
LATENCY_KEYS = {"latency_ms", "latency_speedup", "retrieve_speedup", "retrieve_speedup_no_bar",
                "hf_generate_ms", "same_ranking", "threads", "quick"}
SPEEDUP_KEYS = {"structured_single", "structured_batch16", "atomic_single", "atomic_batch16"}


@pytest.fixture(autouse=True)
def one_thread():
    "The scripts set torch's thread count (to 1 here): give the previous one back afterwards."
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_script(name:str):
    "A benchmark script as a module (benchmarks/ is not a package)."
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT/"benchmarks"/f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_json_line(text:str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_step_script_smoke(capsys):
    result = load_script("train_step").main(["--quick"])
    out = capsys.readouterr().out
    assert TRAIN_KEYS <= result.keys() and result["quick"] is True and result["threads"] == 1
    assert last_json_line(out) == json.loads(json.dumps(result))
    assert "## Speedup of the fast step" in out and "% of peak" in out
    for kind in ("structured", "atomic"):
        assert result["max_rel_grad_diff"][kind] < 1e-5
        assert result["ms_per_step"][kind].keys() == {"plain", "fast"}
        assert result["train_speedup"][kind] > 0 and result["gflops"][kind]["fast"] > 0
    assert result["matmul_peak_gflops"] > 0


def test_query_latency_script_smoke(capsys):
    result = load_script("query_latency").main(["--quick"])
    out = capsys.readouterr().out
    assert LATENCY_KEYS <= result.keys() and result["quick"] is True and result["threads"] == 1
    assert last_json_line(out) == json.loads(json.dumps(result))
    assert "## Speedup of the lean decoder" in out
    assert result["same_ranking"] == {"structured": True, "atomic": True}
    for name in ("latency_speedup", "retrieve_speedup", "retrieve_speedup_no_bar"):
        assert result[name].keys() == SPEEDUP_KEYS and all(v > 0 for v in result[name].values())
    for kind in ("structured", "atomic"):
        timed = result["latency_ms"][kind]
        for path in ("plain", "lean", "retrieve_plain_bar", "retrieve_plain", "retrieve_lean"):
            assert timed[f"{path}_single"] > 0 and timed[f"{path}_batch16"] > 0
