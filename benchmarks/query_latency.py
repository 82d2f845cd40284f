"""Benchmark of query latency: the plain and the lean decoder, alone and under `retrieve`.

    python benchmarks/query_latency.py           # 1,000 images; 5 rounds of 40 singles + 10 x 16
    python benchmarks/query_latency.py --quick   # 100 images; 1 round of 4 singles + 1 x 16: smoke

One tiny preset (the tutorial's size; random weights: what a query costs does not depend on them),
loaded once per identifier type and grown with that type's tokens: structured (k=10, c=10) or
atomic identifiers of 1,000 shapes images. The queries are the images' first captions. Every path
searches with 10 beams, returns 10, keeps the beams cut at `max_new_tokens` (the longest
identifier) and uses the same prebuilt trie (`corpus_trie`):

    plain, lean         `beam_search` with `FlamingoDecoder` / `LeanDecoder`, prompts pre-tokenized
    retrieve plain bar  `retrieve(decoder="plain")` under a progress bar: how a query ran before
                        (`progress=True`, and the bar drawn even for a single batch)
    retrieve plain      `retrieve(decoder="plain", progress=False)`
    retrieve lean       `retrieve(decoder="lean")`: the new defaults (plus a row with progress=False
                        if the library's default draws a bar)
    HF generate         the peer: Hugging Face `generate` of the same language model (conditioned
                        for text prompts as `flamingo_forward` does), `prefix_allowed_tokens_fn`

The retrieve rows include tokenization and ranking; their progress bars are drawn into memory, not
to the terminal. Each query (or batch of 16) goes through every path before the next one, the order
reversed on alternate items and rounds, so that load from elsewhere hits all paths alike; tables
show medians over rounds. Before timing, the batches' plain and lean rankings are compared with
`same_ranking(atol=1e-4)` (and Hugging Face's against plain, for information).
Targets, plain / lean: structured >= 3x for one query and >= 2x in batches of 16; atomic >= 2.5x
for one query. The last line printed is the result as JSON.
"""
from __future__ import annotations
import argparse, contextlib, inspect, io, logging, os, platform, statistics, sys, tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _shared, beside this file
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers
from _shared import report, tiny_models
from grace_nb.core import progress_bar
from grace_nb.backbone import Flamingo
from grace_nb.data import write_shapes_corpus
from grace_nb.inference import (DEFAULT_RETRIEVE_PROMPT, FlamingoDecoder, LeanDecoder, beam_search,
                                corpus_trie, retrieve, same_ranking)
from grace_nb.trie import PrefixTrie, TensorTrie

KINDS = ("structured", "atomic")
MODES = ("single", "batch16")
BATCH = 16
NUM_BEAMS = NUM_RETURN = 10
TARGETS = {("structured", "single"): 3.0, ("structured", "batch16"): 2.0, ("atomic", "single"): 2.5}
DEFAULT_PROGRESS = inspect.signature(retrieve).parameters["progress"].default  # "retrieve lean"


class Case(NamedTuple):
    "One identifier type: its model, its identifiers and their tries."
    flamingo: Flamingo
    token_ids: dict
    trie: TensorTrie
    prefix_trie: PrefixTrie  # the same identifiers as a dict trie, for Hugging Face's generate
    longest: int
    eos: int


class Work(NamedTuple):
    "One timed item: query texts (for retrieve) and their left-padded prompts (for the decoders)."
    texts: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def build(num_images:int, tmp:Path) -> tuple[dict[str, Case], list[str]]:
    "Per identifier type a tiny model grown with its identifier tokens; the images' first captions."
    json_path = write_shapes_corpus(tmp/"shapes", n_train=0, n_val=0, n_test=num_images,
                                    progress=False)
    shapes, models = tiny_models(json_path, tmp, KINDS)
    cases = {}
    for kind, (flamingo, token_ids) in models.items():
        flamingo.model.eval()
        eos = flamingo.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
        distinct = list(dict.fromkeys(tuple(ids) for ids in token_ids.values()))
        cases[kind] = Case(flamingo, token_ids, corpus_trie(token_ids, eos), PrefixTrie(distinct),
                           max(map(len, token_ids.values())), eos)
    return cases, [r.captions[0] for r in shapes.records]


def work_items(tokenizer, texts:list[str], size:int) -> list[Work]:
    "Consecutive groups of `size` queries, tokenized as retrieve does (its prompt, left padding)."
    items = []
    for i in range(0, len(texts), size):
        group = texts[i:i + size]
        enc = tokenizer([DEFAULT_RETRIEVE_PROMPT.format(query=q) for q in group], padding=True,
                        padding_side="left", return_tensors="pt")
        items.append(Work(group, enc.input_ids, enc.attention_mask))
    return items


@contextlib.contextmanager
def text_only(model):
    """The Flamingo layers conditioned as `flamingo_forward` conditions them for text prompts: one
    all-zero visual token set, which no token attends to, since the prompts hold no <image>. The
    language model's own forward sets the media locations from the input ids at every call, as
    Hugging Face's `generate` needs."""
    lang, latents = model.lang_encoder, model.perceiver.latents
    vis_x = torch.zeros(1, 1, latents.shape[0], model.vis_dim, dtype=latents.dtype,
                        device=latents.device)
    for layer in lang._get_decoder_layers(): layer.condition_vis_x(vis_x)
    lang._use_cached_vision_x = False
    # open_flamingo's forward requires attention_mask, which generate leaves out when it is all ones
    mixin_forward = type(lang).forward
    def forward(input_ids=None, attention_mask=None, **kwargs):
        return mixin_forward(lang, input_ids, attention_mask, **kwargs)
    lang.forward = forward
    try: yield
    finally:
        del lang.forward
        lang.clear_conditioned_layers()


def hf_generate(case:Case, work:Work) -> list[list[tuple[list[int], float]]]:
    "Hugging Face beam search constrained by `prefix_allowed_tokens_fn`, shaped like beam_search's."
    model, pad = case.flamingo.model, case.flamingo.tokenizer.pad_token_id
    prompt_len = work.input_ids.shape[1]
    def allowed(_, seq):  # after a whole identifier: the end token again (an empty list masks all)
        return case.prefix_trie.allowed(seq[prompt_len:].tolist()) or [case.eos]
    with text_only(model), torch.no_grad():
        out = model.lang_encoder.generate(
            input_ids=work.input_ids, attention_mask=work.attention_mask,
            max_new_tokens=case.longest, num_beams=NUM_BEAMS, num_return_sequences=NUM_RETURN,
            do_sample=False, length_penalty=1.0, prefix_allowed_tokens_fn=allowed,
            eos_token_id=case.eos, pad_token_id=pad, return_dict_in_generate=True,
            output_scores=True)
    seqs = out.sequences[:, prompt_len:].view(len(work.texts), NUM_RETURN, -1).tolist()
    scores = out.sequences_scores.view(len(work.texts), NUM_RETURN).tolist()
    return [[([t for t in s if t != pad], v) for s, v in zip(ss, vv)]
            for ss, vv in zip(seqs, scores)]


def run_retrieve(case:Case, work:Work, decoder:str, progress:bool|None=None):
    """`retrieve` of the item's queries in one batch; progress None: retrieve's default, "main": a
    bar as the library drew it before, one per call even over a single batch. Bars go to memory."""
    options = dict(trie=case.trie, batch_size=len(work.texts))
    if progress == "main": options["progress"] = False  # the bar is drawn around the call, below
    elif progress is not None: options["progress"] = progress
    call = lambda: retrieve(case.flamingo, work.texts, case.token_ids, decoder=decoder, **options)
    with contextlib.redirect_stderr(io.StringIO()):
        if progress != "main": return call()
        # retrieve now skips the bar for a single batch: draw the one it drew, around the call
        for _ in progress_bar(range(0, len(work.texts), len(work.texts)), desc="retrieve"):
            found = call()
        return found


def paths(case:Case, with_hf:bool) -> dict:
    "Path name -> a function of one work item."
    model, pad = case.flamingo.model, case.flamingo.tokenizer.pad_token_id
    search = dict(num_beams=NUM_BEAMS, num_return=NUM_RETURN, max_new_tokens=case.longest,
                  keep_unfinished=True)
    def decode(decoder):
        return lambda w: beam_search(decoder, w.input_ids, w.attention_mask, case.trie, case.eos,
                                     **search)
    out = {"plain": decode(FlamingoDecoder(model, pad)), "lean": decode(LeanDecoder(model, pad)),
           "retrieve_plain_bar": lambda w: run_retrieve(case, w, "plain", "main"),
           "retrieve_plain": lambda w: run_retrieve(case, w, "plain", False),
           "retrieve_lean": lambda w: run_retrieve(case, w, "lean")}  # the new defaults
    if DEFAULT_PROGRESS is not False:
        out["retrieve_lean_no_bar"] = lambda w: run_retrieve(case, w, "lean", False)
    if with_hf: out["hf_generate"] = lambda w: hf_generate(case, w)
    return out


def timed_rounds(runs:dict, items:list[Work], rounds:int) -> dict[str, list[float]]:
    "Per path, ms per query in each round; each item goes through all paths, the order alternating."
    names, queries = list(runs), sum(len(w.texts) for w in items)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        for i, work in enumerate(items):
            for name in (names if (i + r) % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                runs[name](work)
                totals[name] += time.perf_counter() - start
        for name in names: per_round[name].append(totals[name] * 1e3 / queries)
    return per_round


def agreement(found:list, expected:list) -> float:
    "Share of prompts whose rankings agree (`same_ranking`, atol 1e-4)."
    return sum(same_ranking([f], [e], atol=1e-4) for f, e in zip(found, expected)) / len(expected)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 images, 1 round (CI smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    quick, full = (100, 1, 4, 1), (1_000, 5, 40, 10)
    num_images, rounds, num_single, num_batches = quick if args.quick else full
    with tempfile.TemporaryDirectory() as tmp:
        cases, queries = build(num_images, Path(tmp))
    num_batches = max(1, min(num_batches, (len(queries) - num_single) // BATCH))
    single_texts = queries[:num_single]
    batch_texts = queries[num_single:num_single + num_batches * BATCH]
    some = next(iter(cases.values())).flamingo
    print(f"# query-latency benchmark: torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); "
          f"{'--quick: timings not meaningful' if args.quick else 'full run'}")
    print(f"# tiny preset Flamingo ({some.num_parameters():,} parameters), random weights; "
          f"{num_images} shapes images; {len(single_texts)} single queries, {len(batch_texts)} in "
          f"batches of {BATCH}; {NUM_BEAMS} beams, {NUM_RETURN} returned; median of {rounds} "
          f"interleaved round(s)")
    print()

    result = {"latency_ms": {}, "latency_speedup": {}, "retrieve_speedup": {},
              "retrieve_speedup_no_bar": {}, "hf_generate_ms": {}, "same_ranking": {},
              "hf_agreement": {}}
    checks = [("identifiers", "vocabulary", "max_new_tokens", "plain = lean (batches)",
               "HF generate = plain (share of prompts)")]
    table = [("identifiers", "path", "ms/query single", f"ms/query batch {BATCH}")]
    speedups = [("identifiers", "queries", "plain / lean", "retrieve: plain with bar / lean",
                 "retrieve, bars off", "target", "result (decoder, retrieve, bars off)")]
    hf_problem = None
    for kind, case in cases.items():
        singles = work_items(case.flamingo.tokenizer, single_texts, 1)
        batches = work_items(case.flamingo.tokenizer, batch_texts, BATCH)
        runs = paths(case, with_hf=hf_problem is None)
        # rankings compared before any timing (which makes this pass the decoders' warm-up)
        plain_found = [found for w in batches for found in runs["plain"](w)]
        lean_found = [found for w in batches for found in runs["lean"](w)]
        same = same_ranking(lean_found, plain_found, atol=1e-4)
        hf_share = None
        if "hf_generate" in runs:
            try:
                hf_found = [found for w in batches for found in runs["hf_generate"](w)]
                hf_share = agreement(hf_found, plain_found)
            except Exception as error:  # the peer is for information: say why, go on without it
                hf_problem = f"{type(error).__name__}: {error}"[:300]
                del runs["hf_generate"]
        checks.append((kind, f"{case.flamingo.vocab_size:,}", case.longest, same,
                       "not run" if hf_share is None else f"{hf_share:.0%}"))
        result["same_ranking"][kind], result["hf_agreement"][kind] = same, hf_share
        for run in runs.values(): run(singles[0])  # every path's warm-up
        ms = {}
        for mode, items in (("single", singles), ("batch16", batches)):
            for name, values in timed_rounds(runs, items, rounds).items():
                ms[f"{name}_{mode}"] = statistics.median(values)
        for name in runs:
            label = "HF generate (peer)" if name == "hf_generate" else name.replace("_", " ")
            table.append((kind, label, *(f"{ms[f'{name}_{mode}']:.2f}" for mode in MODES)))
        if "hf_generate" in runs:
            result["hf_generate_ms"][kind] = {m: round(ms.pop(f"hf_generate_{m}"), 3)
                                              for m in MODES}
        result["latency_ms"][kind] = {k: round(v, 3) for k, v in ms.items()}
        lean_no_bar = "retrieve_lean" if DEFAULT_PROGRESS is False else "retrieve_lean_no_bar"
        for mode in MODES:
            key, target = f"{kind}_{mode}", TARGETS.get((kind, mode))
            ratios = (ms[f"plain_{mode}"] / ms[f"lean_{mode}"],
                      ms[f"retrieve_plain_bar_{mode}"] / ms[f"retrieve_lean_{mode}"],
                      ms[f"retrieve_plain_{mode}"] / ms[f"{lean_no_bar}_{mode}"])
            names = ("latency_speedup", "retrieve_speedup", "retrieve_speedup_no_bar")
            for name, ratio in zip(names, ratios):
                result[name][key] = round(ratio, 3)
            verdict = "" if args.quick or target is None else ", ".join(
                "PASS" if ratio >= target else "FAIL" for ratio in ratios)
            speedups.append((kind, "one" if mode == "single" else f"batch of {BATCH}",
                             *(f"{ratio:.2f}x" for ratio in ratios),
                             "-" if target is None else f">= {target:.1f}x", verdict))
    if hf_problem is not None:
        table.append(("-", "HF generate (peer)", f"failed: {hf_problem}", ""))
        result["hf_generate_ms"]["error"] = hf_problem

    sections = [("Same rankings? (plain against lean beam search: same_ranking, atol 1e-4)",
                 checks),
                ("Milliseconds per query", table), ("Speedup of the lean decoder", speedups)]
    note = ("plain / lean: beam_search alone. retrieve: the whole call (tokenize, search, rank); "
            "'with bar' is retrieve as it ran before (progress bar on), against the new defaults.")
    return report(sections, note, result, args.threads, args.quick)


if __name__ == "__main__": main()
