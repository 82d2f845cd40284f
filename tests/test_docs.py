"""The documentation website (`make docs` -> _docs/), checked in a real browser.

The site is (re)built by docs/build.py (incremental: a no-op when nothing changed), served from _docs/ on localhost
and driven with headless Chromium through selenium. Chromium and chromedriver are Debian packages that
.ci/setup-browser installs (`make test` runs it); without them these tests fail under CI=true and skip elsewhere.
Screenshots of the home page and two notebook pages are left in tests/artifacts/ (home, inference, pipeline).
"""
import functools, http.server, importlib.util, json, os, re, shutil, socket, subprocess, sys, threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urljoin, urlsplit
from urllib.request import Request, urlopen

import pytest

from test_notebooks import PROGRESS, RAW_TABLE   # a progress bar and a raw Markdown table, as the notebook checks see them

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT/"_docs"
ARTIFACTS = ROOT/"tests"/"artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

_spec = importlib.util.spec_from_file_location("docs_build", ROOT/"docs"/"build.py")
docs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_build)


def _no_browser(reason: str):
    "Fail under CI (the browser test is part of `make test`), skip on a developer's machine"
    message = f"{reason}; run .ci/setup-browser (it installs Debian's chromium and chromium-driver)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"): pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def site() -> Path:
    "_docs/, brought up to date with the notebooks by docs/build.py"
    if os.environ.get("DOCS_NO_BUILD") != "1":
        run = subprocess.run([sys.executable, str(ROOT/"docs"/"build.py")], cwd=ROOT, capture_output=True, text=True)
        if run.returncode: pytest.fail(f"docs/build.py failed:\n{(run.stdout + run.stderr)[-4000:]}")
    assert (DOCS/"index.html").exists(), "no _docs/index.html: run `make docs`"
    return DOCS


@pytest.fixture(scope="session")
def base_url(site):
    "The site served by Python's http.server on a free localhost port"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="session")
def browser():
    "Headless Chromium (Debian's) through chromedriver, with the console log recorded"
    if not (CHROMIUM and CHROMEDRIVER): _no_browser("chromium or chromedriver is not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError: _no_browser("selenium is not installed (`make install` installs the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _open(browser, url: str) -> list[str]:
    "Load `url` and wait for it; returns the page's SEVERE console messages"
    browser.get_log("browser")   # drop what earlier pages left
    browser.get(url)
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _sidebar(browser) -> list[str]:
    "The page links of the sidebar (furo's navigation tree), in order"
    from selenium.webdriver.common.by import By
    return [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".sidebar-tree a.reference")]


def _page(url: str) -> str: return Path(urlsplit(url).path).name


def test_every_notebook_is_a_page_in_order(browser, base_url):
    "The sidebar lists every numbered notebook of nbs/, in numeric order; the home page is index.ipynb"
    _open(browser, base_url)
    expected = [docs_build.page_name(p, {}) + ".html" for p in docs_build.source_notebooks() if p.stem != "index"]
    assert [_page(url) for url in _sidebar(browser)] == expected
    assert browser.find_element("css selector", "article h1").text.startswith("grace_nb")


def _image_outputs(page: str) -> int:
    "How many image outputs the page's notebook has (docs/build.py's Sphinx source of the page)"
    source = docs_build.SRC/(Path(page).stem + ".ipynb")
    if not source.exists(): return 0
    cells = json.loads(source.read_text())["cells"]
    return sum(any(k.startswith("image/") for k in out.get("data", {})) for c in cells for out in c.get("outputs", []))


def test_pages_load_without_console_errors_and_show_their_figures(browser, base_url):
    """Each page loads with no SEVERE console message; every image on it has loaded (natural width > 0), one per
    image output of its notebook; where a page has math, MathJax (served from the site) has typeset it"""
    from selenium.webdriver.support.ui import WebDriverWait
    _open(browser, base_url)
    pages = [base_url] + _sidebar(browser) + [urljoin(base_url, "search.html"), urljoin(base_url, "genindex.html")]
    problems, figures = {}, {}
    for url in pages:
        errors, page = _open(browser, url), _page(url) or "index.html"
        broken = browser.execute_script(
            "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        shown = browser.execute_script("return document.querySelectorAll('.cell_output img').length")
        figures[page] = shown
        if shown != _image_outputs(page): errors.append(f"{shown} output images shown, notebook has {_image_outputs(page)}")
        if browser.execute_script("return document.querySelectorAll('.math').length"):
            try: WebDriverWait(browser, 15).until(lambda d: d.execute_script("return document.querySelectorAll('mjx-container').length"))
            except Exception: errors.append("math not typeset by MathJax")
        if errors or broken: problems[page] = errors + [f"image not shown: {src}" for src in broken]
    assert not problems, problems
    assert figures.get("data.html", 0) >= 1, figures   # 01_data's example images


class _Links(HTMLParser):
    "The href targets and element ids of one HTML page"
    def __init__(self):
        super().__init__(); self.hrefs, self.ids = [], set()
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"): self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"): self.hrefs.append((attrs["href"], "internal" in (attrs.get("class") or "")))


def _parse(text: str) -> _Links:
    parser = _Links(); parser.feed(text); return parser


def _status(url: str) -> int:
    "HTTP status of a HEAD request to `url`"
    try:
        with urlopen(Request(url, method="HEAD")) as response: return response.status
    except HTTPError as error: return error.code


def test_sidebar_and_page_links_resolve(browser, base_url, site):
    """Every sidebar link and every site-internal link of every page answers HTTP 200; the #anchors of the site's
    own links (navigation, tables of contents, notebook-to-notebook links) exist. nbdev's symbol links (`train_grace`
    in prose) are checked for the page only: nbdev links private names and methods that have no show_doc entry."""
    _open(browser, base_url)
    for url in _sidebar(browser): assert _status(url) == 200, url
    pages = {p.name: _parse(p.read_text()) for p in site.glob("*.html")}
    bad = []
    for name, links in pages.items():
        for href, sphinx_link in links.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")): continue
            target = urljoin(urljoin(base_url, name), href)
            path = urlsplit(target).path.lstrip("/") or "index.html"
            status = _status(target.split("#")[0])
            if status != 200: bad.append(f"{name}: {href} -> HTTP {status}")
            elif sphinx_link and parts.fragment and path in pages and parts.fragment not in pages[path].ids:
                bad.append(f"{name}: {href} -> no #{parts.fragment} on {path}")
    assert not bad, "\n".join(bad[:30])


@pytest.mark.parametrize("page,name", [("training.html", "train_grace"), ("inference.html", "beam_search")])
def test_api_name_documented_on_its_page(browser, base_url, page, name):
    """show_doc's entry is a section of the page (anchor as nbdev links it) with its signature and docstring, and a
    heading of the page menu ("On this page")"""
    from selenium.webdriver.common.by import By
    _open(browser, urljoin(base_url, page))
    section = browser.find_element(By.ID, name).find_element(By.XPATH, "./ancestor-or-self::section[1]")
    assert section.find_element(By.CSS_SELECTOR, "h2, h3, h4").text.startswith(name)
    assert f"def {name}(" in section.text and section.find_elements(By.TAG_NAME, "em"), section.text[:500]
    menu = [a.get_attribute("textContent").strip() for a in browser.find_elements(By.CSS_SELECTOR, ".toc-drawer a.reference")]
    assert name in menu, menu


def test_api_index_lists_every_entry(site):
    "The site's index (genindex.html) lists the API entries of every page: each show_doc heading is an index entry"
    entries = re.findall(r'<li><a href="([\w.-]+\.html)#index-\d+">([^<]+)</a>', (site/"genindex.html").read_text())
    names = {name for _, name in entries}
    assert {"train_grace", "beam_search", "load_profile", "TensorTrie", "reproduce"} <= names, sorted(names)[:50]
    assert len({page for page, _ in entries}) >= 12, sorted({page for page, _ in entries})


@pytest.mark.parametrize("query,page", [("train_grace", "training.html"), ("beam_search", "inference.html")])
def test_search_finds_api_name(browser, base_url, query, page):
    "The site's search page (Sphinx's client-side index) returns the page documenting `query`"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    errors = _open(browser, urljoin(base_url, f"search.html?q={query}"))
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results ul.search li"))
    hits = [_page(a.get_attribute("href")) for a in browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")]
    assert page in hits, hits
    assert not errors, errors




def test_pages_show_clean_outputs(browser, base_url):
    """Every notebook page shows outputs (the notebooks are committed with them), and no page shows U+FFFD, a
    progress bar or a Markdown table left as raw text"""
    from selenium.webdriver.common.by import By
    _open(browser, base_url)
    problems = {}
    for url in [base_url] + _sidebar(browser):
        _open(browser, url)
        page, found = _page(url) or "index.html", []
        outputs = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".cell_output")]
        if not outputs: found.append("no outputs: the notebook was committed without them (`make outputs NB=...`)")
        if "\ufffd" in browser.find_element(By.TAG_NAME, "body").get_attribute("textContent"): found.append("U+FFFD")
        found += [f"progress bar: {m.group(0)!r}" for text in outputs for m in [PROGRESS.search(text)] if m][:3]
        raw = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".cell_output pre") if RAW_TABLE.search(e.text)]
        found += [f"raw Markdown table: {text[:80]!r}" for text in raw[:3]]
        if found: problems[page] = found
    assert not problems, problems


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5): return True
    except OSError: return False


def test_external_links_reach_their_hosts(site):
    """Every link, script and image of the site that leaves it names a host this machine can reach (the site is
    built and read offline: nbdev's source links point to the site's own source pages, not to a repository)"""
    hosts = {}
    for page in site.rglob("*.html"):
        for url in re.findall(r'(?:href|src)="(https?://[^"]+)"', page.read_text()):
            parts = urlsplit(url)
            hosts.setdefault((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), f"{page.name}: {url}")
    unreachable = [where for (host, port), where in hosts.items() if not _reachable(host, port)]
    assert not unreachable, "links to hosts that cannot be reached:\n" + "\n".join(unreachable[:20])


def _line_of(module: str, start: str) -> int:
    "The 1-based line of grace_nb/`module`.py that starts with `start` (where a show_doc source link points)"
    lines = (ROOT/"grace_nb"/f"{module}.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(start))


def _show_doc(module: str, line: int, name: str, params: str, ret: str = "") -> str:
    "show_doc's Markdown as fastcore writes it (every callable as `def`)"
    return (f"[source](https://github.com/grace-nb/grace_nb/blob/main/grace_nb/{module}.py#L{line})"
            f'{{target="_blank" style="float:right; font-size:smaller"}}\n\n### {name}\n\n'
            f"```python\ndef {name}(\n    {params}\n){ret}:\n```\n\n*A docstring.*")


def test_class_signatures_are_rewritten():
    """docs/build.py shows a class as a class: bases for an exception (whose signature is only *args, **kwargs), the
    constructor's parameters for another; a function, and a link to a line that is not a class, stay as they are"""
    error = _show_doc("trie", _line_of("trie", "class TrieError"), "TrieError", "*args, **kwargs")
    assert "```python\nclass TrieError(GraceError, ValueError)\n```" in docs_build.class_signatures(error)
    params = "identifier_map:IdentifierMap, # the map\n    tokenizer:PreTrainedTokenizerBase"
    trie = _show_doc("trie", _line_of("trie", "class TensorTrie"), "TensorTrie", params)
    assert f"```python\nclass TensorTrie(\n    {params}\n)\n```" in docs_build.class_signatures(trie)
    function = _show_doc("trie", _line_of("trie", "def "), "some_function", "x:int", "->int")
    assert docs_build.class_signatures(function) == function
    assert docs_build.class_signatures(error.replace("#L", "#L1")) == error.replace("#L", "#L1")  # not a class there


_CLIPPED_TABLES = """
const article = document.querySelector('article').getBoundingClientRect();
return [...document.querySelectorAll('article table')].flatMap((table, i) => {
  const box = table.parentElement, edge = box.getBoundingClientRect();
  const scrolls = ['auto', 'scroll'].includes(getComputedStyle(box).overflowX);
  if (edge.right > article.right + 2) return [`table ${i}: its box runs past the article`];
  if (box.scrollWidth > box.clientWidth + 1 && !scrolls) return [`table ${i}: columns cut off, no scrollbar`];
  return [];
});"""


_CLIPPED_CODE = """
return [...document.querySelectorAll('.cell_input pre')].filter(p => p.scrollWidth > p.clientWidth + 1)
  .map(p => p.textContent.split('\\n').reduce((a, b) => a.length >= b.length ? a : b));"""


def test_signatures_and_tables_read_on_every_page(browser, base_url):
    """No page shows a class's signature as `def SomeClass(*args, **kwargs)`, every table fits the page or scrolls
    inside its own box (none runs past the article, none is cut without a scrollbar), and no code cell's line is cut
    (its lines are at most 100 characters: tests/test_notebooks.py)"""
    from selenium.webdriver.common.by import By
    _open(browser, base_url)
    problems = {}
    for url in [base_url] + _sidebar(browser):
        _open(browser, url)
        page = _page(url) or "index.html"
        code = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "article .highlight pre")]
        found = [text.splitlines()[0] for text in code if re.match(r"def [A-Z]\w*\(", text)]
        found += browser.execute_script(_CLIPPED_TABLES)
        found += [f"code cell clipped: {line[:60]!r}" for line in browser.execute_script(_CLIPPED_CODE)]
        if found: problems[page] = found
    assert not problems, problems
    _open(browser, urljoin(base_url, "trie.html"))
    entry = browser.find_element(By.ID, "trieerror").find_element(By.CSS_SELECTOR, ".highlight pre")
    assert entry.get_attribute("textContent").strip() == "class TrieError(GraceError, ValueError)"


def test_home_page_has_no_stale_caveat(browser, base_url):
    """The home page no longer says that the ablations, beam sweep and latency sweep are missing from the results file
    (they are in it, and the table below the old paragraph reports them)"""
    from selenium.webdriver.common.by import By
    _open(browser, base_url)
    text = " ".join(browser.find_element(By.TAG_NAME, "article").text.split())
    for stale in ("are not in this file", "last run from random weights"): assert stale not in text


@pytest.mark.parametrize("page,shot", [("", "home.png"), ("inference.html", "inference.png"), ("pipeline.html", "pipeline.png")])
def test_screenshots(browser, base_url, page, shot):
    "Screenshots of the home page and two notebooks are kept as test artefacts (tests/artifacts/*.png)"
    _open(browser, urljoin(base_url, page))
    browser.execute_script("localStorage.clear()")   # forget the search highlights of the tests above
    _open(browser, urljoin(base_url, page))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS/shot
    path.unlink(missing_ok=True)
    assert browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
