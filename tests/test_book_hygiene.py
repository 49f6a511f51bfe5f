"""The book's sources follow the chapter conventions; data-driven over book/*.ipynb.

Every check reads files only (nothing is executed), so it runs in well under a
second and covers each chapter as soon as its notebook is added.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TOC = ROOT / "_toc.yml"
SOURCE_SUFFIXES = (".md", ".ipynb")
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))

DEVICES_LINE = re.compile(
    r"""jax\.config\.update\(\s*["']jax_num_cpu_devices["']\s*,\s*8\s*\)"""
)
JAX_USE = re.compile(r"\bjax\.")
IMPORTS_TVQ = re.compile(r"^\s*(import tvq\b|from tvq(\.\w+)* import )", re.MULTILINE)
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1\s*$", re.MULTILINE | re.DOTALL)
H1 = re.compile(r"^# \S", re.MULTILINE)


def toc_files(node):
    """Every `file:` (and the `root:`) named anywhere in a parsed _toc.yml."""
    found = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                found.append(node[key])
        for value in node.values():
            found.extend(toc_files(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(toc_files(item))
    return found


def source_of(entry):
    """The file on disk for a toc entry (written without its suffix), or None."""
    for suffix in ("", *SOURCE_SUFFIXES):
        path = ROOT / f"{entry}{suffix}"
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            return path
    return None


def cells(nb, cell_type):
    return [c for c in nb["cells"] if c["cell_type"] == cell_type]


def source(cell):
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_toc_entries_exist_on_disk():
    entries = toc_files(yaml.safe_load(TOC.read_text(encoding="utf-8")))
    assert entries, "_toc.yml names no pages"
    missing = [e for e in entries if source_of(e) is None]
    assert not missing, f"_toc.yml entries with no .md/.ipynb file: {missing}"
    assert len(entries) == len(set(entries)), f"duplicate toc entries: {entries}"


def test_every_page_in_book_is_in_toc():
    entries = toc_files(yaml.safe_load(TOC.read_text(encoding="utf-8")))
    listed = {source_of(e) for e in entries}
    pages = [
        p
        for suffix in SOURCE_SUFFIXES
        for p in BOOK.rglob(f"*{suffix}")
        if not any(part.startswith((".", "_")) for part in p.relative_to(BOOK).parts)
    ]
    unlisted = sorted(str(p.relative_to(ROOT)) for p in pages if p not in listed)
    assert not unlisted, f"pages in book/ missing from _toc.yml: {unlisted}"


def test_no_top_level_static_folder():
    # Jupyter Book adds every .js under a root-level _static to every page, which
    # would include each file of the vendored MathJax (see _config.yml).
    assert not (ROOT / "_static").exists(), "use book/_static, not _static"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
class TestNotebook:
    def test_stored_without_outputs(self, path):
        dirty = [
            i
            for i, c in enumerate(load(path)["cells"])
            if c["cell_type"] == "code"
            and (c.get("outputs") or c.get("execution_count") is not None)
        ]
        assert not dirty, f"{path.name}: code cells {dirty} have outputs or counts"

    def test_kernelspec(self, path):
        assert load(path)["metadata"].get("kernelspec") == KERNELSPEC

    def test_first_code_cell_forces_eight_cpu_devices(self, path):
        code = cells(load(path), "code")
        assert code, f"{path.name} has no code cell"
        lines = source(code[0]).splitlines()
        at = [i for i, line in enumerate(lines) if DEVICES_LINE.search(line)]
        assert at, (
            f"{path.name}: the first code cell must call "
            'jax.config.update("jax_num_cpu_devices", 8)'
        )
        early_use = [
            line
            for line in lines[: at[0]]
            if JAX_USE.search(line) and "jax.config.update(" not in line
        ]
        assert not early_use, f"{path.name}: JAX used before the device count is set"

    def test_header(self, path):
        first = load(path)["cells"][0]
        assert first["cell_type"] == "markdown", f"{path.name}: first cell not markdown"
        text = source(first)
        assert text.startswith("# "), f"{path.name}: first cell must open with '# '"
        for part in ("What you will learn", "Prerequisites", "Runtime"):
            assert part in text, f"{path.name}: header lacks '{part}'"

    def test_single_title(self, path):
        titles = [
            line
            for c in cells(load(path), "markdown")
            for line in H1.findall(FENCE.sub("", source(c)))
        ]
        assert len(titles) == 1, f"{path.name}: {len(titles)} level-1 headings"

    def test_has_a_figure(self, path):
        code = "\n".join(source(c) for c in cells(load(path), "code"))
        assert "plt.show()" in code or "savefig(" in code, f"{path.name}: no figure"

    def test_has_exercise_with_dropdown_solution(self, path):
        text = "\n".join(source(c) for c in cells(load(path), "markdown"))
        assert re.search(r"exercise", text, re.IGNORECASE), f"{path.name}: no exercise"
        assert re.search(r"^:class:\s*dropdown\s*$", text, re.MULTILINE), (
            f"{path.name}: no solution in a ':class: dropdown' admonition"
        )

    def test_imports_tvq(self, path):
        code = "\n".join(source(c) for c in cells(load(path), "code"))
        assert IMPORTS_TVQ.search(code), f"{path.name} never imports tvq"

    def test_last_code_cell_checks_runtime(self, path):
        last = source(cells(load(path), "code")[-1])
        assert "time.perf_counter() - chapter_start" in last, (
            f"{path.name}: the last code cell must assert the runtime claim"
        )
