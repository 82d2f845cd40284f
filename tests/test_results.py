"""Results shown in the README and the notebooks are computed from the committed metrics files (nbs/results/*.json),
never typed by hand.

A notebook shows a result with a cell that reads a file of nbs/results/ and starts with `#| echo: false` (the page
and the README show its output only). Here those cells run again, from the files as committed, and what they show
must be what the notebook was saved with, and what README.md (generated from index.ipynb) says.
"""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/"nbs"
RESULTS = NBS/"results"


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _shown(outputs: list) -> str:
    "The Markdown (else plain text) a cell's outputs show"
    parts = []
    for output in outputs:
        data = output.get("data", {}) if isinstance(output, dict) else {}
        for kind in ("text/markdown", "text/plain"):
            if kind in data:
                parts.append(_source({"source": data[kind]})); break
    return "\n".join(parts).strip()


def result_cells(notebook: dict) -> list[int]:
    "The `#| echo: false` cells, from the first one that reads nbs/results/ on (later ones use what it loaded)"
    cells = [i for i, c in enumerate(notebook["cells"]) if c["cell_type"] == "code" and _source(c).startswith("#| echo: false")]
    reading = [i for i in cells if "results/" in _source(notebook["cells"][i])]
    return [i for i in cells if reading and i >= reading[0]]


NOTEBOOKS = [p for p in sorted(NBS.glob("*.ipynb")) if result_cells(json.loads(p.read_text()))]


def test_results_files_are_committed_metrics():
    "The reference runs' metrics are in the repository, each a JSON object"
    files = sorted(RESULTS.glob("*.json"))
    assert any(f.name == "shapes_seed42.json" for f in files), files
    for f in files: assert isinstance(json.loads(f.read_text()), dict), f


def test_some_notebooks_show_results():
    assert {"index.ipynb", "13_pipeline.ipynb"} <= {p.name for p in NOTEBOOKS}, [p.name for p in NOTEBOOKS]


def run_result_cells(path: Path, notebook: dict) -> dict[int, list]:
    """{cell: its outputs now}: `notebook`'s exported and hidden import cells, then its result cells, run again
    (nbs/results/refresh_result_cells.py saves them)"""
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    shell, outputs = CaptureShell(path), {}
    with working_directory(path.parent):
        for cell in notebook["cells"]:
            src = _source(cell)
            # the library's definitions and imports (exported cells), and the hidden import cells
            if cell["cell_type"] == "code" and (src.startswith("#| export") or
                                                src.startswith("#| hide") and re.search(r"^(from|import) ", src, re.M)):
                shell.run(src)
        for i in result_cells(notebook):
            outputs[i] = shell.run(_source(notebook["cells"][i]))
            if shell.exc: raise AssertionError(f"{path.name} cell {i} failed on the committed results: {shell.exc!r}")
    return outputs


@pytest.fixture(scope="module")
def rerun():
    "{notebook: {cell: what it shows now}}: each notebook's result cells, run again"
    return {path.name: {i: _shown(out) for i, out in run_result_cells(path, json.loads(path.read_text())).items()}
            for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_results_match_the_files(rerun, path):
    "Each result cell was saved showing what the committed files give (re-save the notebook after the files change)"
    notebook = json.loads(path.read_text())
    stale = [i for i, now in rerun[path.name].items() if _shown(notebook["cells"][i].get("outputs", [])) != now]
    assert not stale, f"{path.name}: cells {stale} show other values than nbs/results/ gives: `make outputs NB=nbs/{path.name}`"


def test_readme_shows_the_computed_results(rerun):
    "Every result the home page computes stands in README.md as computed (`make readme` after `make outputs`)"
    readme = (ROOT/"README.md").read_text()
    missing = [i for i, now in rerun["index.ipynb"].items() if now and now not in readme]
    assert not missing, f"README.md lacks the output of index.ipynb's result cells {missing}: run `make readme`"


def test_pool_study_supports_what_settings_and_readme_say():
    "pool_study.json: the image-size default is the measured best, and the train-split pool holds no test image."
    from grace_nb.core import load_profile
    study = json.loads((RESULTS/"pool_study.json").read_text())
    sizes, shapes = study["sizes"]["sizes"], load_profile("shapes")
    best = max(sizes, key=lambda s: (s["R@1"], -s["image_size"]))
    assert (best["image_size"], best["patch_size"]) == (shapes.image_size, shapes.patch_size)  # "the defaults stay"
    assert all(s["image_size"] // s["patch_size"] == 8 for s in sizes)  # "the same 8 x 8 grid"
    own = next(r for r in study["rows"] if r["profile"] == "landscapes")
    assert own["pool"]["source"] == "landscapes (train split)" and own["pool"]["images"] == study["corpus"]["train"]["images"]
    assert next(r for r in study["rows"] if r["profile"] == "landscapes-shapes-pool")["pool"]["source"].startswith("shapes")


def test_lr_choice_supports_the_profile():
    """lr_choice.json: the `[shapes]` learning rate is the one at which structured identifiers memorize the most (the
    lesser of train and test), and settings.ini's comment quotes the file's numbers"""
    from grace_nb.core import load_profile
    rows = json.loads((RESULTS/"lr_choice.json").read_text())["rows"]
    structured = [r for r in rows if r["identifier"] == "structured"]
    best = max(structured, key=lambda r: min(r["memorized_train"], r["memorized_test"]))
    assert best["lr"] == float(load_profile("shapes").lr)
    settings = " ".join(line.lstrip("# ") for line in (ROOT/"settings.ini").read_text().splitlines())
    for r in structured: assert f"{r['memorized_train']:.1f} / {r['memorized_test']:.1f}" in settings, r


def test_length_penalty_comment_follows_the_sweep():
    "settings.ini's length_penalty comment: the sweep's best mean R@1 is at -2, string prefers -2, semantic 1"
    from grace_nb.core import load_profile
    sweep = json.loads((RESULTS/"shapes_seed42.json").read_text())["length_penalty"]
    lp = {(r["identifier"], r["length_penalty"]): r["R@1"] for r in sweep["rows"]}
    best = lambda kind: max((-2.0, 0.0, 1.0), key=lambda p: lp[(kind, p)])
    assert (sweep["best"], best("string"), best("semantic")) == (-2.0, -2.0, 1.0)
    assert float(load_profile("shapes").length_penalty) == 1.0
    assert "Its best mean R@1 is at -2" in (ROOT/"settings.ini").read_text()
