"""The committed notebooks as a reader meets them (on GitHub, on the website): saved with their outputs, in short
cells, and with outputs that hold values, not progress bars, library chatter, raw Markdown or undecodable bytes.

These checks read the .ipynb files; nothing is executed (`make outputs NB=...` runs a notebook and saves it).
"""
import ast, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/"nbs").glob("*.ipynb"))
MAX_LINES = 40
MAX_WIDTH = 100   # the website clips longer code lines
# a cell ending in a call of one of these shows nothing worth saving (a check, a print, a plot command, show_doc)
QUIET_CALLS = ("test_", "expect_fail", "print", "show_doc", "nbdev_export", "plt.", "display")
SKIP_FLAGS = ("slow", "gpu")
PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+(\.\d+)?(it/s|s/it)\]")
CHATTER = re.compile(r"Loading weights|Loading checkpoint|\w+Warning: |warnings\.warn\(|^\s*warn\(|Some weights of|"
                     r"You are using a model of type|Setting `pad_token_id`", re.M)
RAW_TABLE = re.compile(r"^\|.*\|\s*\n\|(\s*:?-{3,}:?\s*\|)+", re.M)


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _directives(source: str) -> set[str]:
    return {line[2:].split(":")[0].strip() for line in source.splitlines() if line.startswith("#|")}


def ends_in_value(source: str) -> bool:
    "Does the cell end in an expression whose value a reader should see (not a check, a print or a constant)?"
    lines = [line for line in source.splitlines() if not line.startswith(("%", "!"))]
    try: body = ast.parse("\n".join(lines)).body
    except SyntaxError: return False
    if not body or not isinstance(body[-1], ast.Expr) or source.rstrip().endswith(";"): return False
    value = body[-1].value
    if isinstance(value, ast.Constant): return False
    return not (isinstance(value, ast.Call) and ast.unparse(value.func).startswith(QUIET_CALLS))


def _code_cells(path: Path) -> list[tuple[int, dict, str]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, c, _source(c)) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def _output_text(output: dict) -> str:
    if "text" in output: return _source({"source": output["text"]})
    data = output.get("data", {})
    return "".join(_source({"source": data[k]}) for k in ("text/plain", "text/markdown", "text/html") if k in data)


def test_ends_in_value():
    "The rule the output check uses, on the kinds of last lines notebooks have"
    assert ends_in_value("x = 1\nx") and ends_in_value("model.retrieve(q)[:3]") and ends_in_value("Markdown(table)")
    assert not ends_in_value("x = 1") and not ends_in_value("test_eq(1, 1)") and not ends_in_value("print(x)")
    assert not ends_in_value("def f(): pass") and not ends_in_value("plt.show()") and not ends_in_value("'a note'")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_value_cells_are_saved_with_outputs(path):
    "Every cell that ends in a value (not exported, hidden or flagged slow/gpu) was saved with its output"
    bare = [i for i, cell, src in _code_cells(path)
            if not src.lstrip().startswith(("#| export", "#| hide")) and not _directives(src) & set(SKIP_FLAGS)
            and "eval: false" not in src and ends_in_value(src) and not cell.get("outputs")]
    assert not bare, f"{path.name}: cells {bare} end in a value but were saved without output: `make outputs NB=nbs/{path.name}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_are_short(path):
    f"No code cell is longer than {MAX_LINES} lines (directives included)"
    long = {i: len(src.strip().splitlines()) for i, _, src in _code_cells(path) if len(src.strip().splitlines()) > MAX_LINES}
    assert not long, f"{path.name}: cells over {MAX_LINES} lines (cell: lines): {long}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_page(path):
    f"No line of a code cell is longer than {MAX_WIDTH} characters (the site clips longer ones)"
    wide = {i: max(len(line) for line in src.splitlines()) for i, _, src in _code_cells(path)
            if any(len(line) > MAX_WIDTH for line in src.splitlines())}
    assert not wide, f"{path.name}: cells with lines over {MAX_WIDTH} characters (cell: longest): {wide}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_clean(path):
    """Saved outputs hold no progress bar, no library chatter, no U+FFFD, no Markdown table printed as raw text, and
    no figure twice"""
    problems, images = [], {}
    for i, cell, _ in _code_cells(path):
        for output in cell.get("outputs", []):
            text = _output_text(output)
            if "\ufffd" in text: problems.append(f"cell {i}: U+FFFD (undecodable bytes) in an output")
            if PROGRESS.search(text): problems.append(f"cell {i}: a progress bar: {PROGRESS.search(text).group(0)!r}")
            if CHATTER.search(text): problems.append(f"cell {i}: library chatter: {CHATTER.search(text).group(0)!r}")
            rendered = "text/markdown" in output.get("data", {}) or "text/html" in output.get("data", {})
            if not rendered and RAW_TABLE.search(text): problems.append(f"cell {i}: a Markdown table printed as raw text")
            for kind, data in output.get("data", {}).items():
                if kind.startswith("image/"):
                    key = _source({"source": data})
                    if key in images: problems.append(f"cell {i}: the figure of cell {images[key]} again")
                    images.setdefault(key, i)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
