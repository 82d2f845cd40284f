"""What the speed benchmarks share: the tiny models they time, and what they print (Markdown tables,
titled sections, the result as one JSON line at the end)."""
from __future__ import annotations
import json
from pathlib import Path

import numpy as np

from grace_nb.backbone import grow_vocabulary, load_flamingo, write_tiny_preset
from grace_nb.data import load_karpathy
from grace_nb.identifiers import build_identifiers, identifier_token_ids, train_bpe_tokenizer
from grace_nb.training import PROMPT_TEXTS


def tiny_models(json_path:Path, # a shapes corpus (`write_shapes_corpus`)
                tmp:Path, # where the preset is written
                kinds:tuple[str, ...], # identifier kinds
               ) -> tuple:
    """The corpus and, per identifier kind, a tiny-preset Flamingo (random weights, tutorial size,
    a BPE tokenizer of 2,000 tokens) grown with that kind's tokens, and its identifier token ids.
    Structured identifiers: k = c = 10 over random stand-ins for CLIP's image embeddings."""
    shapes = load_karpathy(json_path, progress=False)
    captions = [c for r in shapes.records for c in r.captions]
    tokenizer = train_bpe_tokenizer(captions + list(PROMPT_TEXTS), vocab_size=2000)
    preset = write_tiny_preset(tmp/"tiny", tokenizer)
    image_ids = [r.image_id for r in shapes.records]
    embeddings = np.random.default_rng(0).normal(size=(len(image_ids), 64))
    models = {}
    for kind in kinds:
        flamingo = load_flamingo(preset)
        extra = dict(embeddings=embeddings, k=10, c=10) if kind == "structured" else {}
        identifier_map = build_identifiers(kind, image_ids, **extra)
        grow_vocabulary(flamingo, identifier_map)
        models[kind] = (flamingo, identifier_token_ids(identifier_map, flamingo.tokenizer))
    return shapes, models


def markdown(rows:list[tuple]) -> str:
    "A Markdown table from a header row and data rows."
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def report(sections:list[tuple[str, list[tuple]]], # (title, table rows) in print order
           note:str, # printed after the tables
           result:dict, # printed last, as one JSON line (updated with threads and quick)
           threads:int, quick:bool) -> dict:
    "Print each section's title and table, the note, then the result as JSON; returns the result."
    for title, rows in sections: print(f"## {title}\n{markdown(rows)}\n")
    print(note)
    result.update(threads=threads, quick=quick)
    print(json.dumps(result))
    return result
