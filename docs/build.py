"""Build the documentation website offline into _docs/ (`make docs`).

`nbdev-docs` renders the site with Quarto, which cannot be installed offline. This script renders the same
nbdev-processed notebooks with Sphinx + myst-nb instead, in four steps:

1. stage    nbs/*.ipynb -> _docs_build/nbs/. Notebooks are committed with their outputs (`make outputs`), and the
            site shows those: nothing is run (`--execute none`, the default; `make test` runs every notebook once,
            in nbdev-test). `--execute missing` runs a notebook saved without any output the way `nbdev-test` runs
            it, `all` runs every notebook; runs are cached by the notebook's checksum.
2. process  nbdev's own `proc_nbs` (show_doc rendered, export/hidden cells removed, doc links added), with
            _docs_build/ as the project root, so the repository's _proc/ (used by `make readme`) is left alone.
3. convert  Quarto front matter and cell options into what myst-nb reads; show_doc's output (`output: asis`)
            becomes page Markdown, so each API entry is a heading of the page menu, an entry of the index and a
            search hit; nbdev's source links point to the module's source page that this build writes (source/);
            the home page (index.ipynb) gets the table of contents: every other notebook, in number order.
4. render   sphinx-build (which never executes a notebook) -> _docs_build/html -> _docs/, with nbdev's absolute
            doc links made relative so that the site works offline and on any host.
"""
import argparse, functools, hashlib, json, math, os, re, shutil, subprocess, sys, time, traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

for _name, _value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "TOKENIZERS_PARALLELISM": "false"}.items(): os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/"nbs"
BUILD = ROOT/"_docs_build"     # staging project (gitignored)
STAGE = BUILD/"nbs"            # notebooks with outputs, input of proc_nbs
PROC = BUILD/"_proc"           # proc_nbs output (it always writes to <project root>/_proc)
SRC = BUILD/"src"              # Sphinx sources
HTML = BUILD/"html"            # Sphinx output, copied to _docs/
OUT = ROOT/"_docs"
STAMP_KEY = "grace_docs"       # notebook metadata key holding the checksum a staged notebook was made from
# MathJax files the site needs (TeX input, CommonHTML output, lazily loaded extensions, menu)
EXTRA = BUILD/"extra"          # files copied as they are to the site's root: the module source pages (source/)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
MATHJAX_PARTS = ["tex-chtml.js", "output/chtml", "input/tex/extensions", "ui", "a11y", "adaptors"]


class DocsError(Exception):
    "The website cannot be built: a notebook failed to run or to process, or a page is missing"


def log(message: str):
    print(f"docs: {message}", flush=True)


def notebook_order(path: Path) -> tuple:
    "Sort key of a notebook: index first, then by its leading number, then by name"
    number = re.match(r"(\d+)", path.name)
    return (path.stem != "index", int(number.group(1)) if number else math.inf, path.name)


def source_notebooks(nbs: Path = NBS) -> list[Path]:
    "Every notebook of `nbs` (not `_`/`.`-prefixed ones), home page first, then in numeric order"
    return sorted((p for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", "."))), key=notebook_order)


def has_outputs(notebook: dict) -> bool:
    "Was any code cell of `notebook` saved with an output?"
    return any(cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _directives(source: str) -> tuple[dict, str]:
    "Split the leading `#| key: value` lines off `source`: ({key: value}, rest)"
    lines, found = source.splitlines(keepends=True), {}
    while lines and lines[0].startswith("#|"):
        key, _, value = lines.pop(0)[2:].strip().partition(":")
        if key.strip(): found[key.strip()] = value.strip()
    return found, "".join(lines)


def mark_skipped_cells(notebook: dict, skip_flags: list[str]) -> dict:
    "Add `#| eval: false` to cells flagged with `skip_flags`, so nbdev's processing does not run them either"
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code": continue
        directives, _ = _directives(_source(cell))
        if set(directives) & set(skip_flags) and "eval" not in directives:
            cell["source"] = "#| eval: false\n" + _source(cell)
    return notebook


def run_notebook(src: Path, dst: Path, skip_flags: list[str]):
    """Run notebook `src` as nbdev-test does (in its folder; cells flagged with one of `skip_flags` are skipped and keep
    the outputs they were saved with) and write it with its outputs to `dst`"""
    from execnb.shell import CaptureShell
    from fastcore.nbio import read_nb, write_nb
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    os.environ["IN_TEST"] = "1"   # quiet(): no progress bars in the outputs
    notebook = read_nb(src)
    NBProcessor(nb=notebook, rm_directives=False)   # parses each cell's `#|` directives (left in its source) for _skip_cell
    shell = CaptureShell(src)
    try:
        with working_directory(src.parent):
            shell.run_all(notebook, exc_stop=True, preproc=_skip_cell(notebook, skip_flags))
    except Exception:
        sys.stderr.write((shell.prettytb(fname=src) or traceback.format_exc()) + "\n"); sys.exit(1)
    write_nb(notebook, dst)


def save_outputs(src: Path, skip_flags: list[str]):
    "Run notebook `src` in place and save it with its new outputs, cleaned (`make outputs NB=nbs/06_training.ipynb`)"
    run_notebook(src, src, skip_flags)
    subprocess.run([str(Path(sys.executable).parent/"nbdev-clean"), "--fname", str(src)], check=True)
    log(f"saved {src.name} with its outputs")


def _run_in_subprocess(src: Path, dst: Path, skip_flags: list[str]) -> tuple[str, float, str | None]:
    "run_notebook in a fresh Python (an IPython shell takes over its process's __main__): (name, seconds, error)"
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--run-one", str(src), str(dst), "--flags", " ".join(skip_flags)],
                          capture_output=True, text=True)
    return src.name, time.time() - start, (done.stderr[-6000:] or "failed") if done.returncode else None


def _write_if_changed(path: Path, text: str):
    if not path.exists() or path.read_text() != text: path.write_text(text)


def stage(sources: list[Path], execute: str, skip_flags: list[str], workers: int) -> dict[str, float]:
    "Copy `sources` into STAGE, running those `execute` selects; returns {notebook: seconds} of the runs"
    STAGE.mkdir(parents=True, exist_ok=True)
    _write_if_changed(BUILD/"pyproject.toml", (ROOT/"pyproject.toml").read_text())   # nbdev's config for proc_nbs
    for extra in NBS.iterdir():   # other files of nbs/ (Quarto config, images): proc_nbs copies them along
        if extra.is_file() and extra.suffix != ".ipynb" and not extra.name.startswith("."):
            if not (STAGE/extra.name).exists() or (STAGE/extra.name).read_bytes() != extra.read_bytes():
                shutil.copy2(extra, STAGE/extra.name)
    names = {p.name for p in sources}
    for old in STAGE.glob("*.ipynb"):
        if old.name not in names: old.unlink()
    to_run, checksums = [], {}
    for src in sources:
        raw = src.read_bytes()
        notebook = json.loads(raw)
        run = execute == "all" or (execute == "missing" and not has_outputs(notebook))
        checksums[src.name] = hashlib.md5(raw + f"{run}|{' '.join(skip_flags)}".encode()).hexdigest()
        dst = STAGE/src.name
        if dst.exists() and json.loads(dst.read_text())["metadata"].get(STAMP_KEY) == checksums[src.name]: continue
        if run: to_run.append(src)
        else: _finish_stage(notebook, dst, checksums[src.name], skip_flags)
    timings = {}
    if to_run:
        from tqdm.auto import tqdm
        log(f"running {len(to_run)} notebook(s) saved without outputs: {', '.join(p.name for p in to_run)}")
        failures = []
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(to_run)))) as pool:
            jobs = [pool.submit(_run_in_subprocess, src, STAGE/(src.name + ".run"), skip_flags) for src in to_run]
            for job in tqdm(as_completed(jobs), total=len(jobs), desc="running notebooks", unit="nb"):
                name, seconds, error = job.result()
                timings[name] = seconds
                if error: failures.append(f"{name}:\n{error}")
                else:
                    run_path = STAGE/(name + ".run")
                    _finish_stage(json.loads(run_path.read_text()), STAGE/name, checksums[name], skip_flags)
                    run_path.unlink()
        if failures: raise DocsError("notebook(s) failed to run:\n" + "\n".join(failures))
    return timings


def _finish_stage(notebook: dict, dst: Path, checksum: str, skip_flags: list[str]):
    notebook["metadata"][STAMP_KEY] = checksum
    dst.write_text(json.dumps(mark_skipped_cells(notebook, skip_flags), indent=1, ensure_ascii=False) + "\n")


def process(workers: int):
    "nbdev's own notebook processing of STAGE into PROC"
    from nbdev.serve import proc_nbs
    try: proc_nbs(str(STAGE), n_workers=workers)
    except Exception as error: raise DocsError(f"nbdev's processing (proc_nbs) failed: {error}") from error


def page_name(notebook_path: Path, front: dict) -> str:
    "The page a notebook becomes: nbdev's `output-file` (00_core.ipynb -> core), else its name without the number"
    if front.get("output-file"): return Path(front["output-file"]).stem
    return re.sub(r"^\d+[a-zA-Z0-9]*_", "", notebook_path.stem)


_SOURCE_LINK = re.compile(r"\[source\]\((\S+?)\)\{[^}]*\}")
_MODULE_URL = re.compile(r"https?://\S+?/blob/[^/]+/(?:[\w-]+/)*([\w]+)\.py(?:#L(\d+))?")


def local_source(url: str) -> str:
    "nbdev's repository link of a symbol (git_url/blob/branch/grace_nb/trie.py#L21) -> its line on the site's source page"
    match = _MODULE_URL.fullmatch(url)
    if not match: return url
    return f"source/{match.group(1)}.py.html" + (f"#L-{match.group(2)}" if match.group(2) else "")


def write_source_pages(lib: Path, target: Path):
    "A syntax-highlighted page per module of `lib` (target/<module>.py.html, a #L-<n> anchor per line): source links land here"
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    target.mkdir(parents=True, exist_ok=True)
    css = HtmlFormatter(style="default").get_style_defs(".highlight")
    for module in sorted(lib.glob("*.py")):
        if module.name.startswith("_"): continue
        body = highlight(module.read_text(), PythonLexer(), HtmlFormatter(linenos="table", lineanchors="L", anchorlinenos=True))
        page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{lib.name}/{module.name}</title>'
                f'<link rel="icon" href="../_static/favicon.svg"><style>{css} body {{ font-family: monospace; margin: 1em; }} '
                f'.linenos a {{ color: #999; }} :target {{ background: #ffc; }}</style></head>\n<body>'
                f'<p><a href="../index.html">grace_nb</a> / {lib.name}/{module.name} (generated from the notebooks)</p>{body}</body></html>\n')
        _write_if_changed(target/f"{module.name}.html", page)


_NB_LINK = re.compile(r"\]\((?:nbs/)?([\w.-]+)\.ipynb(#[\w.-]+)?\)")
_SHOWDOC_DEF = re.compile(r"\[source\]\(\S*?/(grace_nb/\w+\.py)#L(\d+)\)(?s:.*?)```python\ndef (\w+)\((?s:(.*?))\n?\)(?:->[^:\n]*)?:\n```")


@functools.lru_cache(maxsize=None)
def _module_lines(path: Path) -> list[str]:
    "A library module's lines, read once per build (show_doc links point into them)"
    return path.read_text().splitlines()


def class_signatures(text: str, lib: Path = ROOT) -> str:
    """show_doc's Markdown with a class shown as one: fastcore writes every callable as `def Name(...)`. A class whose
    signature is only `(*args, **kwargs)` (an exception, a protocol) shows its bases, `class TrieError(GraceError,
    ValueError)`; another shows what constructing it takes, `class Profile(name:str, ...)`"""
    def fix(match: re.Match) -> str:
        module, line, name, params = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        path = lib/module
        if not path.is_file(): return match.group(0)
        head = next((l.strip() for l in _module_lines(path)[line - 1:line + 5] if l.lstrip().startswith(("class ", "def "))), "")
        if not head.startswith(f"class {name}"): return match.group(0)
        code_start = match.start(3) - match.start(0) - len("def ")
        if params.strip() in ("*args, **kwargs", ""): sig = head.rstrip(":")
        else: sig = f"class {name}({params}\n)"
        return match.group(0)[:code_start] + sig + "\n```"
    return _SHOWDOC_DEF.sub(fix, text)
_WIDGET = "application/vnd.jupyter.widget-view+json"


def convert(notebook: dict, pages: dict[str, str]) -> tuple[dict, dict]:
    "A processed notebook as myst-nb reads it: (notebook, front matter). `pages` maps notebook stems to page names"
    front, cells = {}, []
    def fix_links(text: str) -> str:
        text = _SOURCE_LINK.sub(lambda m: f'<a class="nbdev-source" href="{local_source(m.group(1))}">source</a>', text)
        return _NB_LINK.sub(lambda m: f"]({pages.get(m.group(1), m.group(1))}.ipynb{m.group(2) or ''})"
                            if m.group(1) in pages else m.group(0), text)
    for cell in notebook["cells"]:
        source = _source(cell)
        if cell["cell_type"] == "raw" and source.startswith("---") and not front:
            import yaml
            front = yaml.safe_load(source.strip().strip("-")) or {}
            head = f"# {front.get('title', '')}\n"
            if front.get("description"): head += f"\n> {' '.join(str(front['description']).split())}\n"
            cells.append({"cell_type": "markdown", "metadata": {}, "source": head})
            continue
        if cell["cell_type"] == "markdown":
            if not source.strip() or "THIS FILE WAS AUTOGENERATED" in source: continue
            cells.append({"cell_type": "markdown", "metadata": {}, "source": fix_links(source),
                          **({"attachments": cell["attachments"]} if cell.get("attachments") else {})})
            continue
        if cell["cell_type"] != "code" or not source.strip(): continue
        directives, code = _directives(source)
        tags = [t for t in cell.get("metadata", {}).get("tags", [])]
        if directives.get("include") == "false": continue
        if directives.get("echo") == "false": tags.append("remove-input")
        if directives.get("output") == "false": tags.append("remove-output")
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is not None:
                if _WIDGET in data: continue   # a live widget (a tqdm bar): its text/plain is only the widget's repr
                if "text/markdown" in data:   # show_doc output: its leading rule becomes a CSS border (site.css)
                    text = class_signatures(re.sub(r"\A\s*---\s*\n", "", _source({"source": data["text/markdown"]})))
                    data["text/markdown"] = fix_links(text)
                output = {**output, "data": data}
            outputs.append(output)
        if directives.get("output") == "asis":   # show_doc: its Markdown joins the page (headings in the menu, the index)
            cells.extend(_asis_cells(outputs))
            continue
        if "remove-input" in tags and not outputs: continue
        metadata = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("tags", "execution")}
        cells.append({"cell_type": "code", "execution_count": cell.get("execution_count"), "source": code.strip("\n"),
                      "outputs": outputs, "metadata": {**metadata, **({"tags": tags} if tags else {})}})
    for number, cell in enumerate(cells): cell["id"] = f"cell-{number}"   # nbformat 4.5 wants an id per cell
    metadata = {k: v for k, v in notebook["metadata"].items() if k not in ("widgets", STAMP_KEY, "jupytext")}
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": metadata, "cells": cells}, front


_HEADING = re.compile(r"^#{2,4} (\S+)\s*$", re.M)


def _asis_cells(outputs: list[dict]) -> list[dict]:
    "Markdown cells from the text/markdown outputs of an `output: asis` cell, each API heading also an index entry"
    cells = []
    for output in outputs:
        text = _source({"source": output.get("data", {}).get("text/markdown", "")})
        if not text.strip(): continue
        names = _HEADING.findall(text)
        # `__` would read as bold in the heading (PrefixTrie.__contains__): escaped, the title is the name itself
        text = _HEADING.sub(lambda m: m.group(0).replace("_", "\\_"), text)
        index = "".join(f"```{{index}} single: {name}\n```\n" for name in names)
        cells.append({"cell_type": "markdown", "metadata": {}, "source": index + text})
    return cells


def write_sources(sources: list[Path]) -> list[str]:
    "Convert every processed notebook into SRC; returns the page names in order (home page first)"
    SRC.mkdir(parents=True, exist_ok=True)
    fronts, pages = {}, {}
    for src in sources:
        processed = PROC/src.name
        if not processed.exists(): raise DocsError(f"{src.name}: nbdev's processing wrote no {processed}")
        notebook = json.loads(processed.read_text())
        fronts[src.name] = notebook
        _, front = convert({**notebook, "cells": notebook["cells"][:1]}, {})
        pages[src.stem] = page_name(src, front)
    names = list(pages.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates: raise DocsError(f"two notebooks would make the same page: {duplicates}")
    if "index" not in names: raise DocsError("nbs/index.ipynb (the home page) is missing")
    for src in sources:
        notebook, _ = convert(fronts[src.name], pages)
        if pages[src.stem] == "index":
            toc = "\n".join(n for n in names if n != "index")
            notebook["cells"].append({"cell_type": "markdown", "metadata": {},
                                      "id": "toc", "source": f"```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{toc}\n```\n"})
        _write_if_changed(SRC/f"{pages[src.stem]}.ipynb", json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    for old in SRC.glob("*.ipynb"):
        if old.stem not in names: old.unlink()
    write_source_pages(ROOT/"grace_nb", EXTRA/"source")
    for image in NBS.rglob("*"):   # pictures the notebooks' Markdown shows (a notebook may write one when it runs)
        relative = image.relative_to(NBS)
        if image.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith((".", "_")) for part in relative.parts):
            (SRC/relative).parent.mkdir(parents=True, exist_ok=True)
            if not (SRC/relative).exists() or (SRC/relative).read_bytes() != image.read_bytes(): shutil.copy2(image, SRC/relative)
    return names


def copy_mathjax():
    "Copy the MathJax files the site needs from the django-static-mathjax wheel into _docs_build/static/mathjax"
    import importlib.util
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise DocsError("MathJax is missing: `pip install django-static-mathjax` (the dev extra has it)")
    es5 = Path(list(spec.submodule_search_locations)[0])/"static"/"mathjax"/"es5"
    target = BUILD/"static"/"mathjax"
    for part in MATHJAX_PARTS:
        if (target/part).exists(): continue
        (target/part).parent.mkdir(parents=True, exist_ok=True)
        if (es5/part).is_dir(): shutil.copytree(es5/part, target/part)
        else: shutil.copy2(es5/part, target/part)


def render(names: list[str], workers: int, strict: bool):
    "sphinx-build SRC -> HTML, then HTML -> _docs with nbdev's absolute doc links made relative"
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    # Sphinx rebuilds only changed pages; when the rendering itself changed (conf.py, this file, CSS), rebuild all
    recipe = hashlib.md5(b"".join(p.read_bytes() for p in sorted((ROOT/"docs").rglob("*"))
                                      if p.is_file() and "__pycache__" not in p.parts)).hexdigest()
    fresh = not (BUILD/"recipe").exists() or (BUILD/"recipe").read_text() != recipe
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(ROOT/"docs"), "-d", str(BUILD/"doctrees"),
               "-j", str(max(1, workers)), str(SRC), str(HTML)] + (["-E"] if fresh else []) + (["-W", "--keep-going"] if strict else [])
    if subprocess.run(command).returncode: raise DocsError("sphinx-build failed (its messages are above)")
    (BUILD/"recipe").write_text(recipe)
    missing = [n for n in names if not (HTML/f"{n}.html").exists()]
    if missing: raise DocsError(f"pages missing after sphinx-build: {missing}")
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.copytree(HTML, OUT, ignore=shutil.ignore_patterns(".buildinfo", ".doctrees"))
    site = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/"
    for page in OUT.glob("*.html"):
        text = page.read_text()
        if site in text: page.write_text(text.replace(f'href="{site}', 'href="'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", choices=["missing", "all", "none"], default=os.environ.get("DOCS_EXECUTE", "none"),
                        help="which notebooks to run before processing: none (default: the saved outputs are shown), "
                             "those saved without outputs, all")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("DOCS_WORKERS", min(2, os.cpu_count() or 1))))
    parser.add_argument("--strict", action="store_true", help="turn Sphinx warnings into errors")
    parser.add_argument("--save", nargs="+", metavar="NOTEBOOK", type=Path,
                        help="run these notebooks in place (cells flagged slow/gpu skipped, keeping their saved outputs) "
                             "and save them with their outputs; --run-flags FLAG... also runs the cells flagged FLAG")
    parser.add_argument("--run-flags", nargs="*", default=[], help="with --save: flags whose cells run too (e.g. slow)")
    parser.add_argument("--run-one", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)   # used by stage()
    parser.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one: return run_notebook(Path(args.run_one[0]), Path(args.run_one[1]), args.flags.split())
    from nbdev.config import get_config
    skip_flags = get_config(ROOT).tst_flags
    skip_flags = skip_flags.split() if isinstance(skip_flags, str) else list(skip_flags or [])
    if args.save:
        for notebook in args.save: save_outputs(notebook.resolve(), [f for f in skip_flags if f not in args.run_flags])
        return 0
    sources = source_notebooks()
    steps = {}
    try:
        start = time.time(); timings = stage(sources, args.execute, skip_flags, args.workers); steps["stage"] = time.time() - start
        start = time.time(); process(args.workers); steps["process"] = time.time() - start
        start = time.time(); names = write_sources(sources); copy_mathjax(); render(names, args.workers, args.strict)
        steps["render"] = time.time() - start
    except DocsError as error:
        print(f"docs: FAILED: {error}", file=sys.stderr); return 1
    for name, seconds in sorted(timings.items()): log(f"ran {name} in {seconds:.1f} s")
    log(f"{len(names)} pages in {OUT.relative_to(ROOT)}/ ({', '.join(f'{k} {v:.1f} s' for k, v in steps.items())}); "
        f"open {OUT.relative_to(ROOT)}/index.html or serve it: python -m http.server -d {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__": sys.exit(main())
