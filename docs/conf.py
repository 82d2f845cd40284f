"""Sphinx configuration of the offline documentation website (`make docs`; see docs/build.py).

docs/build.py writes the Sphinx sources (nbdev-processed notebooks) into _docs_build/src and runs
`sphinx-build -c docs`; this file only says how to render them. Nothing here loads anything from the network:
MathJax comes from the django-static-mathjax wheel, the theme (furo) ships its own assets.
"""
import re
from pathlib import Path

from docutils import nodes

project = "grace_nb"
author = "grace_nb developers"
copyright = "grace_nb developers (Apache-2.0)"
html_title = "grace_nb"

extensions = ["myst_nb"]
# the notebooks arrive with their outputs (saved by their authors or by docs/build.py, which runs nbdev's
# processing and, where needed, the notebook itself): Sphinx must never execute one
nb_execution_mode = "off"
# show_doc output is Markdown; parse it as MyST so its headings, code blocks and tables render
nb_render_markdown_format = "myst"
# widget outputs would pull require.js and the widget manager from a CDN: the site stays offline
nb_ipywidgets_js = {}
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

html_theme = "furo"
# docs/_static holds site.css; build.py copies MathJax into _docs_build/static/mathjax
html_static_path = ["_static", str(Path(__file__).resolve().parents[1]/"_docs_build"/"static")]
html_css_files = ["site.css"]
# the module source pages build.py writes (source/<module>.py.html), where nbdev's source links point
html_extra_path = [str(Path(__file__).resolve().parents[1]/"_docs_build"/"extra")]
# docs/_templates/page.html: furo's footer without its links to external sites (the site is checked offline)
templates_path = ["_templates"]
# an explicit icon, so browsers do not ask for a /favicon.ico the site does not have (a console error)
html_favicon = "_static/favicon.svg"
html_copy_source = False
html_show_sourcelink = False
# MathJax 3 from the local copy build.py makes (relative to _static)
mathjax_path = "mathjax/tex-chtml.js"
html_theme_options = {"navigation_with_keys": True}


def _nbdev_id(title: str) -> str:
    "The anchor nbdev's doc links use for a heading: lower case, spaces to `-`, `_` and `.` kept (`#trie.allowed_mask`)"
    slug = re.sub(r"[^\w\s.-]", "", title.strip().lower())
    return re.sub(r"\s+", "-", slug)


def _add_nbdev_anchors(app, doctree):
    "Give every heading (sections, and show_doc's headings in outputs, which become rubrics) nbdev's anchor too"
    document_ids = set(doctree.ids)
    for node in [*doctree.findall(nodes.section), *doctree.findall(nodes.rubric)]:
        title = node if isinstance(node, nodes.rubric) else node.next_node(nodes.title)
        if title is None: continue
        anchor = _nbdev_id(title.astext())
        if anchor and anchor not in node["ids"] and anchor not in document_ids:
            node["ids"].append(anchor)
            document_ids.add(anchor)


def setup(app):
    app.connect("doctree-read", _add_nbdev_anchors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
