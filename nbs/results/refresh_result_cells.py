"""Re-run the result cells of notebooks after the files of nbs/results/ changed, and save what they now show.

A result cell starts with `#| echo: false` and reads nbs/results/ (or follows one that does: tests/test_results.py's
rule). Only those cells run again, after the notebook's exported and hidden import cells, so the other saved outputs
(timings, training logs) stay those of the notebook's last full run. `make outputs NB=...` re-runs a whole notebook.

    .venv/bin/python nbs/results/refresh_result_cells.py nbs/08_evaluation.ipynb [...]   # or: all
"""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT/"tests"))
from test_results import NOTEBOOKS, _shown, run_result_cells  # the rule the tests check the saved outputs with


def refresh(path: Path) -> list[int]:
    "Run `path`'s result cells again and write their outputs into the notebook; returns the cells that now show other values"
    notebook = json.loads(path.read_text())
    changed = []
    for i, outputs in run_result_cells(path, notebook).items():
        if _shown(outputs) != _shown(notebook["cells"][i].get("outputs", [])): changed.append(i)
        notebook["cells"][i]["outputs"] = outputs
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    subprocess.run([str(Path(sys.executable).parent/"nbdev-clean"), "--fname", str(path)], check=True)
    return changed


if __name__ == "__main__":
    paths = NOTEBOOKS if sys.argv[1:] == ["all"] else [Path(p).resolve() for p in sys.argv[1:]]
    for path in paths: print(f"{path.name}: cells {refresh(path)} refreshed")
