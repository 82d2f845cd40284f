"""Benchmark of `grace_nb.inference`: constrained (trie) versus unconstrained beam search on one tiny Flamingo.

    python benchmarks/decode.py           # 300 images, 160 queries, 9 interleaved repeats (about a minute)
    python benchmarks/decode.py --quick   # 30 images, 8 queries, 1 repeat: a smoke run (timings meaningless)

Same model, same queries, same beams (10 beams, 10 returned) and the same `max_new_tokens` (the longest identifier)
for both modes, on structured and atomic identifiers of the same images (random embeddings stand in for CLIP's; the
model is untrained, which changes what is generated but not what a step costs). Both modes keep beams cut at
`max_new_tokens`, as `retrieve` does. The modes are interleaved batch by batch (alternating which goes first), and
the table shows medians over repeats. Target: constrained / unconstrained <= 1.10x.
"""
from __future__ import annotations
import argparse, logging, os, platform, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers
from grace_nb.backbone import grow_vocabulary, load_flamingo, write_tiny_preset
from grace_nb.data import load_karpathy, write_shapes_corpus
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.inference import DEFAULT_RETRIEVE_PROMPT, FlamingoDecoder, beam_search, corpus_trie

TARGET = 1.10
NUM_BEAMS = NUM_RETURN = 10


class TimedDecoder:
    "Wraps a decoder and adds up the time of its prefill (start), its steps (advance) and the cache row selection."
    def __init__(self, decoder):
        self.decoder, self.pad_token_id = decoder, decoder.pad_token_id
        self.prefill = self.step = self.reorder = 0.0; self.steps = self.rows = 0
    def start(self, input_ids, attention_mask, features=None):
        t0 = time.perf_counter(); out = self.decoder.start(input_ids, attention_mask, features)
        self.prefill += time.perf_counter() - t0
        cache, timer = out[1].cache, self
        select = cache.reorder_cache
        def timed_reorder(rows):
            t1 = time.perf_counter(); select(rows); timer.reorder += time.perf_counter() - t1
        cache.reorder_cache = timed_reorder  # the same cache object is updated in place for the whole search
        return out
    def advance(self, state, rows, tokens):
        t0 = time.perf_counter(); out = self.decoder.advance(state, rows, tokens)
        self.step += time.perf_counter() - t0; self.steps += 1; self.rows += len(rows)
        return out


def build(num_images:int, tmp:Path):
    "Tiny preset Flamingo with structured and atomic identifier tokens of `num_images` shapes images; its queries."
    shapes = load_karpathy(write_shapes_corpus(tmp/"shapes", n_train=0, n_val=0, n_test=num_images, progress=False))
    captions = [c for r in shapes.records for c in r.captions]
    flamingo = load_flamingo(write_tiny_preset(tmp/"tiny", train_bpe_tokenizer(captions + [DEFAULT_RETRIEVE_PROMPT])))
    image_ids = [r.image_id for r in shapes.records]
    embeddings = np.random.default_rng(0).normal(size=(num_images, 64))
    maps = {"structured": build_identifiers("structured", image_ids, embeddings=embeddings),
            "atomic": build_identifiers("atomic", image_ids)}
    for identifier_map in maps.values(): grow_vocabulary(flamingo, identifier_map)
    token_ids = {kind: identifier_token_ids(m, flamingo.tokenizer) for kind, m in maps.items()}
    queries = [r.captions[(i // len(shapes.records)) % len(r.captions)] for i, r in
               enumerate(shapes.records * 5)]  # first captions of every image, then second captions, ...
    return flamingo, token_ids, queries


def search_batch(timed:TimedDecoder, batch, trie, eos, max_new_tokens) -> float:
    "Beam search on one batch of queries through `timed`; returns the wall time."
    t0 = time.perf_counter()
    beam_search(timed, batch.input_ids, batch.attention_mask, trie, eos, num_beams=NUM_BEAMS, num_return=NUM_RETURN,
                max_new_tokens=max_new_tokens, keep_unfinished=True)
    return time.perf_counter() - t0


def one_repeat(decoder, batches, trie, eos, max_new_tokens, swap:bool) -> dict:
    """Both modes over all batches, interleaved batch by batch (which mode goes first alternates), so that load from
    elsewhere on the machine hits both alike; per mode the wall time and its parts."""
    timed = {mode: TimedDecoder(decoder) for mode in ("constrained", "unconstrained")}
    totals = dict.fromkeys(timed, 0.0)
    for i, batch in enumerate(batches):
        order = ["constrained", "unconstrained"][::-1 if (i + swap) % 2 else 1]
        for mode in order:
            totals[mode] += search_batch(timed[mode], batch, trie if mode == "constrained" else None, eos, max_new_tokens)
    return {mode: dict(total=totals[mode], prefill=t.prefill, step=t.step, reorder=t.reorder, steps=t.steps, rows=t.rows,
                       search=totals[mode] - t.prefill - t.step) for mode, t in timed.items()}


def print_table(rows:list[tuple]):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(rows[0])); print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]: print(line(r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds; for CI smoke tests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per beam search")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar(); transformers.utils.logging.set_verbosity_error()
    num_images, num_queries, repeats = (30, 8, 1) if args.quick else (300, 160, 9)
    with tempfile.TemporaryDirectory() as tmp:
        flamingo, token_ids, queries = build(num_images, Path(tmp))
    model, tokenizer = flamingo.model.eval(), flamingo.tokenizer
    eos, decoder = tokenizer.convert_tokens_to_ids("<|endofchunk|>"), FlamingoDecoder(flamingo.model, tokenizer.pad_token_id)
    prompts = [DEFAULT_RETRIEVE_PROMPT.format(query=q) for q in queries[:num_queries]]
    batches = [tokenizer(prompts[i:i + args.batch_size], padding=True, padding_side="left", return_tensors="pt")
               for i in range(0, len(prompts), args.batch_size)]
    print(f"# decode benchmark: torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); {'--quick: timings not meaningful' if args.quick else 'full run'}")
    print(f"# tiny preset Flamingo ({flamingo.num_parameters():,} parameters, vocabulary {flamingo.vocab_size:,}), "
          f"{num_images} images, {len(prompts)} queries in batches of {args.batch_size}, {NUM_BEAMS} beams, "
          f"{NUM_RETURN} returned; median of {repeats} interleaved repeats\n")
    cases = {}
    for kind, ids in token_ids.items():
        trie, longest = corpus_trie(ids, eos), max(map(len, ids.values()))
        cases[kind] = dict(trie=trie, longest=longest, runs={"constrained": [], "unconstrained": []})
        one_repeat(decoder, batches[:1], trie, eos, longest, False)  # warm-up
    for r in range(repeats):
        for kind, case in cases.items():
            for mode, parts in one_repeat(decoder, batches, case["trie"], eos, case["longest"], bool(r % 2)).items():
                case["runs"][mode].append(parts)
    med = lambda runs, key: statistics.median(x[key] for x in runs)
    per_query = lambda runs, key: med(runs, key) * 1e3 / len(prompts)
    table = [("identifiers", "mode", "max_new_tokens", "ms/query", "prefill ms/q", "steps ms/q", "  of which cache reorder",
              "search ms/q", "steps/batch", "rows/step")]
    ratios = []
    for kind, case in cases.items():
        for mode, runs in case["runs"].items():
            table.append((kind, mode, case["longest"], f"{per_query(runs, 'total'):.2f}", f"{per_query(runs, 'prefill'):.2f}",
                          f"{per_query(runs, 'step'):.2f}", f"{per_query(runs, 'reorder'):.2f}", f"{per_query(runs, 'search'):.2f}",
                          f"{runs[0]['steps'] / len(batches):.1f}", f"{runs[0]['rows'] / max(runs[0]['steps'], 1):.0f}"))
        ratio = med(case["runs"]["constrained"], "total") / med(case["runs"]["unconstrained"], "total")
        # the ratio of each interleaved pair, to show the spread
        pairs = [c["total"] / u["total"] for c, u in zip(case["runs"]["constrained"], case["runs"]["unconstrained"])]
        ratios.append((kind, ratio, min(pairs), max(pairs)))
    print_table(table)
    print()
    print_table([("identifiers", "constrained / unconstrained (median ms/query)", "per-repeat range", "target", "result")] +
                [(kind, f"{ratio:.3f}x", f"{lo:.3f}-{hi:.3f}x", f"<= {TARGET:.2f}x",
                  "" if args.quick else ("PASS" if ratio <= TARGET else "FAIL")) for kind, ratio, lo, hi in ratios])
    print("\nsearch ms/q = wall time outside the model's prefill and steps: candidate scoring (trie gather or full-vocabulary "
          "top-k), pools, bookkeeping.")
    return ratios


if __name__ == "__main__": main()
