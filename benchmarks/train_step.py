"""Benchmark of one GRACE training step: `training_step` against `fast_training_step`.

    python benchmarks/train_step.py           # the tutorial's 1,900 images; 3 warm-up + 20 steps
    python benchmarks/train_step.py --quick   # 120 images, 3 steps: smoke run, timings meaningless

A step is the tutorial's: 32 memorize examples (an image's cached vision features, then its
identifier) and 64 retrieve examples (a training caption, then its image's identifier), forward +
backward, on the tiny preset (MPT language model: d_model 128, 4 layers, 2 heads). The corpus is the
shapes corpus at the tutorial's split (1,500 train / 100 val / 300 test images; --quick scales it
down), every image memorized, the train captions as retrieve queries, with structured (k=10, c=10)
or atomic identifiers; each identifier type has its own model, grown with its own tokens. The
weights are random (the factory's initialisation): what a step costs does not depend on them.

Per identifier type both paths run on the same batches (step s uses `_step_batches(..., step=s)`),
interleaved step by step with the first path alternating, gradients cleared before each; tables
show medians over the timed steps. Before timing, step 0 is run by both paths to compare their loss
and gradients, and one step of each is counted by torch's FlopCounterMode (forward + backward;
matmul-like operators only). Achieved GFLOP/s are set against the best median rate of square fp32
matmuls measured in the same run with the same number of threads.
Targets, plain / fast: >= 1.8x (structured), >= 2.0x (atomic). The last line printed is JSON.
"""
from __future__ import annotations
import argparse, logging, os, platform, statistics, sys, tempfile, time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _shared, beside this file
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers
from _shared import report, tiny_models
from grace_nb.backbone import Flamingo
from grace_nb.data import write_shapes_corpus
from grace_nb.training import (FeatureCache, TrainConfig, _step_batches, cache_features,
                               fast_training_step, memorize_examples, retrieve_examples,
                               training_step)

KINDS = ("structured", "atomic")
PATHS = {"plain": training_step, "fast": fast_training_step}
TARGETS = {"structured": 1.8, "atomic": 2.0}  # plain / fast, median seconds per step
MEMORIZE_BATCH, RETRIEVE_BATCH = 32, 64


class Case(NamedTuple):
    "One identifier type: its model and the examples and features its steps draw from."
    flamingo: Flamingo
    memorize: list
    retrieve: list
    features: FeatureCache


def build(num_images:int, tmp:Path) -> dict[str, Case]:
    "Shapes corpus at the tutorial's 15:1:3 split; per identifier type a tiny model and its data."
    n_val, n_test = num_images // 19, 3 * num_images // 19
    json_path = write_shapes_corpus(tmp/"shapes", n_train=num_images - n_val - n_test, n_val=n_val,
                                    n_test=n_test, progress=False)
    shapes, models = tiny_models(json_path, tmp, KINDS)
    image_ids = [r.image_id for r in shapes.records]
    cases = {}
    for kind, (flamingo, token_ids) in models.items():
        tok = flamingo.tokenizer
        cases[kind] = Case(flamingo, memorize_examples(tok, token_ids, image_ids),
                           retrieve_examples(tok, token_ids, shapes.queries("train")),
                           cache_features(flamingo, shapes, shapes.records, progress=False))
    return cases


def batches_of(case:Case, step:int) -> tuple:
    "The (memorize batch, retrieve batch, loss scale) of `step`, as the training loop makes them."
    config = TrainConfig(memorize_batch_size=MEMORIZE_BATCH, retrieve_batch_size=RETRIEVE_BATCH)
    pad = case.flamingo.tokenizer.pad_token_id
    return _step_batches(case.memorize, case.retrieve, case.features, config, step, pad)


def run_step(step_fn, model, batches) -> tuple[float, float]:
    "Forward + backward of one step from cleared gradients: (seconds, loss)."
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _ = step_fn(model, *batches)
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def gradients(model) -> dict[str, torch.Tensor]:
    "A copy of every gradient the last backward left."
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def compare_paths(model, batches) -> tuple[float, float]:
    """One step by both paths: the relative loss difference and the largest per-parameter relative
    gradient difference ||g_plain - g_fast|| / ||g_plain|| (a gradient one side lacks is zero)."""
    _, loss_plain = run_step(PATHS["plain"], model, batches); plain = gradients(model)
    _, loss_fast = run_step(PATHS["fast"], model, batches); fast = gradients(model)
    worst = 0.0
    for name in plain.keys() | fast.keys():
        a = plain.get(name); b = fast.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        diff, norm = float((a - b).double().norm()), float(a.double().norm())
        worst = max(worst, diff / norm if norm > 0 else diff)
    model.zero_grad(set_to_none=True)
    return abs(loss_plain - loss_fast) / abs(loss_plain), worst


def count_flops(step_fn, model, batches) -> int:
    "Floating-point operations of one step, forward + backward, as FlopCounterMode counts them."
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loss, _ = step_fn(model, *batches)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(sizes:tuple[int, ...], repeats:int) -> dict[int, float]:
    "GFLOP/s of square fp32 matmuls per size (median of `repeats` after one warm-up)."
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); a @ b; times.append(time.perf_counter() - start)
        rates[n] = 2 * n ** 3 / statistics.median(times) / 1e9
    return rates


def time_steps(case:Case, warmup:int, steps:int) -> dict[str, list[float]]:
    "Seconds per timed step of each path; the paths take turns each step, alternating who starts."
    model, times = case.flamingo.model, {path: [] for path in PATHS}
    for step in range(warmup + steps):
        batches = batches_of(case, step)
        order = list(PATHS) if step % 2 == 0 else list(PATHS)[::-1]
        for path in order:
            seconds, _ = run_step(PATHS[path], model, batches)
            if step >= warmup: times[path].append(seconds)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 images, 3 timed steps (CI smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    num_images, warmup, steps = (120, 1, 3) if args.quick else (1_900, 3, 20)
    examples = MEMORIZE_BATCH + RETRIEVE_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        cases = build(num_images, Path(tmp))
    rates = matmul_peak((512, 1024), 3 if args.quick else 7)
    peak = max(rates.values())
    some = next(iter(cases.values())).flamingo
    print(f"# training-step benchmark: torch {torch.__version__}, {args.threads} torch thread(s), "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"{'--quick: timings not meaningful' if args.quick else 'full run'}")
    print(f"# tiny preset Flamingo ({some.num_parameters(trainable=True):,} trainable parameters), "
          f"random weights; {num_images} shapes images, all memorized; {MEMORIZE_BATCH} memorize + "
          f"{RETRIEVE_BATCH} retrieve examples per step; median of {steps} interleaved steps after "
          f"{warmup} warm-up")
    print("# fp32 matmul peak (median, same thread count): "
          + ", ".join(f"{n}x{n}: {r:.1f} GFLOP/s" for n, r in rates.items()) + "\n")

    result = {"train_speedup": {}, "ms_per_step": {}, "gflops": {},
              "matmul_peak_gflops": round(peak, 2), "max_rel_grad_diff": {}, "rel_loss_diff": {},
              "gflop_per_step": {}}
    table = [("identifiers", "path", "ms/step", "examples/s", "GFLOP/step", "GFLOP/s", "% of peak")]
    speedups = [("identifiers", "vocabulary", "plain ms/step", "fast ms/step", "plain / fast",
                 "per-step range", "target", "result")]
    checks = [("identifiers", "relative loss difference", "max relative gradient difference")]
    for kind, case in cases.items():
        model = case.flamingo.model.train()
        rel_loss, rel_grad = compare_paths(model, batches_of(case, 0))
        checks.append((kind, f"{rel_loss:.2e}", f"{rel_grad:.2e}"))
        flops = {path: count_flops(fn, model, batches_of(case, 0)) for path, fn in PATHS.items()}
        times = time_steps(case, warmup, steps)
        ms, rate = {}, {}
        for path in PATHS:
            seconds = statistics.median(times[path])
            ms[path], rate[path] = seconds * 1e3, flops[path] / seconds / 1e9
            table.append((kind, path, f"{ms[path]:.1f}", f"{examples / seconds:.0f}",
                          f"{flops[path] / 1e9:.2f}", f"{rate[path]:.2f}",
                          f"{100 * rate[path] / peak:.1f}"))
        ratio = ms["plain"] / ms["fast"]
        pairs = [p / f for p, f in zip(times["plain"], times["fast"])]
        verdict = "" if args.quick else ("PASS" if ratio >= TARGETS[kind] else "FAIL")
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}x"
        speedups.append((kind, f"{case.flamingo.vocab_size:,}", f"{ms['plain']:.1f}",
                         f"{ms['fast']:.1f}", f"{ratio:.2f}x", spread, f">= {TARGETS[kind]:.1f}x",
                         verdict))
        result["train_speedup"][kind] = round(ratio, 3)
        result["ms_per_step"][kind] = {p: round(v, 2) for p, v in ms.items()}
        result["gflops"][kind] = {p: round(v, 3) for p, v in rate.items()}
        result["gflop_per_step"][kind] = {p: round(v / 1e9, 4) for p, v in flops.items()}
        result["max_rel_grad_diff"][kind] = rel_grad
        result["rel_loss_diff"][kind] = rel_loss

    sections = [("Step 0, plain against fast: same loss and gradients?", checks),
                ("Time per training step (forward + backward)", table),
                ("Speedup of the fast step", speedups)]
    note = ("GFLOP/s = FlopCounterMode's count of one step / median step time; % of peak: against"
            " the best square fp32 matmul above.")
    return report(sections, note, result, args.threads, args.quick)


if __name__ == "__main__": main()
