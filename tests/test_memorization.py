"The memorization study's pieces (08a_memorization): its run list, the passes-to-memorize reading, its tables."
import json
from pathlib import Path

import pytest

from grace_nb.memorization import (PAPER_PASSES, levers_table, passes_table, passes_to_memorize, study_cells,
                                   study_summary)

ROOT = Path(__file__).resolve().parents[1]


def _row(kind, passes, train, test, lever="profile", r1=1.0):
    return dict(identifier=kind, passes=passes, lever=lever, memorized_train=train, memorized_test=test, **{"R@1": r1})


def test_study_cells_cover_the_papers_budgets():
    cells = study_cells(["numeric", "atomic"])
    assert len({c["name"] for c in cells}) == len(cells)
    profile = {(c["kind"], c["passes"]) for c in cells if c["lever"] == "profile"}
    assert {("numeric", p) for p in PAPER_PASSES.values()} <= profile and {("atomic", 66.7)} <= profile
    assert all(c["passes"] == 33.3 for c in cells if c["lever"] != "profile")
    assert {c["backbone"] for c in cells} == {"pretrained", "scratch"}


def test_passes_to_memorize_needs_train_and_test():
    rows = [_row("a", 8, 95, 80), _row("a", 16.7, 91, 90), _row("a", 33.3, 100, 100),
            _row("b", 8, 10, 95), _row("b", 16.7, 50, 60), _row("c", 8, 95, 95, lever="lr 3e-3")]
    assert passes_to_memorize(rows) == {"a": 16.7, "b": None}  # levers never count; b never reaches 90 on train
    assert passes_to_memorize(rows, threshold=50) == {"a": 8, "b": 16.7}


def test_tables_and_summary_show_every_run():
    rows = [_row("a", 16.7, 10, 20), _row("a", 33.3, 91, 95, r1=7.5), _row("a", 33.3, 50, 40, lever="lr 3e-3")]
    assert "| a | 10 / 20 (1.0) | 91 / 95 (7.5) |" in passes_table(rows)
    assert "| lr 3e-3 | 50 / 40 |" in levers_table(rows) and "| profile | 91 / 95 |" in levers_table(rows)
    summary = study_summary(rows)
    assert "**a** memorizes 90% of train and test images from 33.3 passes" in summary and "lr 3e-3 (50 / 40%)" in summary


def test_committed_study_matches_what_the_pages_say():
    "index and 08a state the study corpus's sizes and its step's batch sizes: they are the results file's"
    study = json.loads((ROOT/"nbs/results/memorization_study.json").read_text())
    assert (study["corpus"]["n_train"], study["corpus"]["n_test"]) == (150, 50)  # "150 train and 50 test images"
    assert (study["memorize_batch_size"], study["retrieve_batch_size"], study["lr"]) == (32, 96, 1e-3)
    for name in ("index.ipynb", "08a_memorization.ipynb"):
        text = (ROOT/"nbs"/name).read_text()
        assert "150 train and 50 test images" in text, name
    assert {r["passes"] for r in study["rows"]} >= set(PAPER_PASSES.values())
