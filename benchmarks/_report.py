"What the speed benchmarks print: Markdown tables, titled sections, and the result as one JSON line at the end."
from __future__ import annotations
import json


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
