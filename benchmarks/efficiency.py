"""Benchmark of Figure 4 (`grace_nb.figure4`): GRACE's constrained decoding against CLIP's search, 1K to 1M images.

    python benchmarks/efficiency.py                   # tiny backbone on the CPU, 1K/10K/100K/1M images (about 10 minutes)
    python benchmarks/efficiency.py --quick           # 300 and 3,000 images, a few queries: a smoke run (seconds)
    python benchmarks/efficiency.py --backbone mpt1b --device cuda --faiss-threads 1,16   # MPT-1B dimensions on a GPU

GRACE: `grace_nb.inference.beam_search` (10 beams, trie-constrained, `max_new_tokens` = the longest identifier) over a
randomly initialised Flamingo (tutorial size, or MPT-1B's dimensions with OpenFlamingo-3B's cross-attention), for
structured, atomic, numeric and string identifiers of N images (synthetic, with the real token counts). CLIP: its text
tower (random weights, the backbone's scale) plus exact search (faiss IndexFlatIP with BLAS for batches; torch matmul),
an IVF index tuned to recall@10 >= 0.95 against exact search, and the reference code's float64 loop as a labelled
strawman. Latency does not depend on the weights, so random weights and synthetic embeddings are used throughout.
Every number is measured in this run; the tables, crossovers and the flat-latency target check are printed.
"""
from __future__ import annotations
import argparse, logging, os, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers
from grace_nb.efficiency import GRACE_KINDS
from grace_nb.figure4 import crossovers, efficiency_findings, latency_ratios, plot_efficiency, run_efficiency, save_efficiency
from grace_nb.figure4 import efficiency_table

TARGET = 1.3  # GRACE latency at the largest corpus / at the smallest, structured identifiers


def _ints(text:str) -> tuple[int, ...]: return tuple(int(float(x)) for x in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 and 3,000 images (unless --sizes), 8 queries, 1 repeat (CI smoke)")
    parser.add_argument("--sizes", type=_ints, default=None, help="corpus sizes, e.g. 1000,1e6 (default 1K, 10K, 100K, 1M)")
    parser.add_argument("--backbone", choices=["tiny", "mpt1b"], default="tiny", help="tiny (tutorial) or mpt1b (MPT-1B dimensions)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: GRACE, CLIP's text tower and the torch search")
    parser.add_argument("--kinds", default=",".join(GRACE_KINDS), help="GRACE identifier kinds, comma separated")
    parser.add_argument("--queries", type=int, default=32, help="queries for throughput")
    parser.add_argument("--batch-size", type=int, default=16, help="queries per beam search / per search call")
    parser.add_argument("--latency-queries", type=int, default=8, help="single queries for latency")
    parser.add_argument("--repeats", type=int, default=3, help="passes per timing (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--faiss-threads", type=_ints, default=(1, 2), help="a faiss exact-search line per thread count")
    parser.add_argument("--strawman-max", type=int, default=1_000_000, help="largest corpus the float64 strawman runs on")
    parser.add_argument("--no-prefill-all", action="store_true", help="skip atomic with the plain (reference) decoder")
    parser.add_argument("--layers", type=int, default=None, help="override the backbone's depth (wiring tests only)")
    parser.add_argument("--out", type=Path, default=None, help="folder for efficiency_<backbone>.json and figure4_<backbone>.png")
    args = parser.parse_args(argv)
    if args.quick: args.queries, args.batch_size, args.latency_queries, args.repeats = 8, 4, 2, 1
    args.sizes = args.sizes or ((300, 3_000) if args.quick else (1_000, 10_000, 100_000, 1_000_000))
    logging.getLogger().setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar(); transformers.utils.logging.set_verbosity_error()
    run = run_efficiency(args.sizes, args.backbone, tuple(args.kinds.split(",")), args.device, queries=args.queries,
                         batch_size=args.batch_size, latency_queries=args.latency_queries, repeats=args.repeats,
                         threads=args.threads, faiss_threads=args.faiss_threads, strawman_max=args.strawman_max,
                         strawman_queries=2 if args.quick else 4, prefill_all=not args.no_prefill_all,
                         paired_rounds=2 if args.quick else 5, layers=args.layers)
    s = run.settings
    print(f"# efficiency benchmark: torch {s['torch']}, faiss {s['faiss']}, {s['cpus']} CPUs ({s['processor']})"
          f"{', ' + s['gpu'] if 'gpu' in s else ''}; {s['time']}; {'--quick: timings not meaningful' if args.quick else 'full run'}")
    print(f"# backbone {s['backbone']}{' cut to ' + str(s['layers']) + ' layer(s) (wiring test)' if s['layers'] else ''} (random weights, {s['dtype']}) on {s['device']}; torch threads {s['threads']}; "
          f"faiss threads {list(s['faiss_threads'])} (IVF: {s['faiss_threads'][0]}); {s['queries']} queries in batches of "
          f"{s['batch_size']}, latency over {s['latency_queries']} single queries, median of {s['repeats']} passes; "
          f"{s['num_beams']} beams; faiss BLAS for calls of >= {s['blas_queries']} queries")
    print("# CLIP rows = text tower + search. Synthetic identifiers and embeddings (see nbs/10_efficiency.ipynb). "
          "On a shared machine other jobs change timings; rerun to see the spread.\n")
    for key, title in [("ms_per_query", "Throughput: ms per query (batched)"), ("qps", "Queries per second (Figure 4, left)"),
                       ("latency_ms", "Latency: ms for one query alone (Figure 4, right)"),
                       ("search_ms", "CLIP search alone, ms per query (batched; text tower excluded)"),
                       ("search_latency_ms", "CLIP search alone, ms for one query"),
                       ("recall_at_10", "IVF recall@10 against exact search"), ("nprobe", "IVF nprobe (tuned)"),
                       ("steps", "GRACE beam steps (longest identifier + end token)"), ("vocab", "GRACE vocabulary size")]:
        print(f"## {title}\n{efficiency_table(run, key)}\n")
    text = next(r for r in run.rows if r["system"] == "CLIP")
    print(f"CLIP text tower: {text['text_ms']:.3f} ms/query batched, {text['text_latency_ms']:.3f} ms for one query\n")
    print("## Output layer of an atomic decoding step (logits, log-softmax, top-20) against vocabulary size")
    print("| images | vocabulary | rows | ms per step |\n|---|---|---|---|")
    for o in run.output_layer: print(f"| {o['n']:,} | {o['vocab']:,} | {o['rows']} | {o['step_ms']:.2f} |")
    print(f"\n## Crossovers: where CLIP (text + search) becomes slower than GRACE\n{crossovers(run, 'ms_per_query')}\n")
    print(f"## Crossovers for one query alone\n{crossovers(run, 'latency_ms')}\n")
    print(f"## Flat latency: largest / smallest corpus (target <= {TARGET}x, structured)\n{latency_ratios(run, TARGET)}\n")
    print(f"## The paper's claims against this run\n{efficiency_findings(run, TARGET)}")
    if args.out:
        json_path = save_efficiency(run, args.out/f"efficiency_{args.backbone}.json")
        plot_efficiency(run, args.out/f"figure4_{args.backbone}.png")
        print(f"\nwrote {json_path} and {args.out/f'figure4_{args.backbone}.png'}")
    return run


if __name__ == "__main__": main()
