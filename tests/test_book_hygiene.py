"""The book's sources follow the chapter conventions; data-driven over book/*.ipynb.

Every check reads files only (nothing is executed; the paper-map check imports
tvq), so it runs in seconds and covers each chapter as soon as its notebook is
added.
"""

import ast
import importlib
import json
import re
import tomllib
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
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
PAPER_MAP = BOOK / "paper_map.md"
# Tags that fold a cell's code in the rendered book (the output stays visible).
FOLDED = {"hide-input", "remove-input", "remove-cell"}
# A cell whose statements are at least this much checking, by lines, is a check
# cell and must be folded; each chapter keeps at least MIN_CHECKS checks.
CHECK_SHARE = 0.5
MIN_CHECKS = 20
MYST_ANCHOR_LEVEL = 3  # _config.yml: sphinx.config.myst_heading_anchors


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


def tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def dotted_name(node):
    """'np.testing.assert_allclose' for that attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def is_check(stmt):
    """An assert, or a call such as np.testing.assert_allclose(...)."""
    if isinstance(stmt, ast.Assert):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        name = dotted_name(stmt.value.func)
        return name.startswith("np.testing.") or name.split(".")[-1].startswith(
            "assert_"
        )
    return False


def line_counts(stmts):
    """(check lines, all lines) of statements, looking inside compound ones.

    A compound statement (for, if, with, try, def) counts its header line as
    code and its body statement by statement, so a loop of asserts is checking
    and a function definition is not.
    """
    checks = total = 0
    for stmt in stmts:
        span = stmt.end_lineno - stmt.lineno + 1
        bodies = [
            getattr(stmt, field)
            for field in ("body", "orelse", "finalbody")
            if isinstance(getattr(stmt, field, None), list)
        ]
        bodies += [handler.body for handler in getattr(stmt, "handlers", [])]
        if is_check(stmt):
            checks, total = checks + span, total + span
        elif bodies:  # the header line is code, the body counts as it is
            c, t = line_counts([s for body in bodies for s in body])
            checks, total = checks + c, total + t + 1
        else:
            total += span
    return checks, total


def cell_tree(cell):
    try:
        return ast.parse(source(cell))
    except SyntaxError:  # IPython magics: not Python
        return ast.Module(body=[], type_ignores=[])


def count_checks(tree):
    return sum(is_check(node) for node in ast.walk(tree) if isinstance(node, ast.stmt))


def slugify(title):
    """The anchor MyST gives a heading (myst_parser's default_slugify)."""
    title = re.sub(r"\$[^$]*\$", "", title)  # math is not part of the slug
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # link text only
    title = title.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.lower().replace(" ", "-"))


def anchors(path):
    """Heading anchors of a page (levels 1..MYST_ANCHOR_LEVEL), made unique."""
    if path.suffix == ".ipynb":
        texts = [source(c) for c in cells(load(path), "markdown")]
    else:
        texts = [path.read_text(encoding="utf-8")]
    found = []
    for text in texts:
        for hashes, title in HEADING.findall(FENCE.sub("", text)):
            if len(hashes) <= MYST_ANCHOR_LEVEL:
                slug, i = slugify(title), 1
                while slug in found:
                    slug, i = f"{slugify(title)}-{i}", i + 1
                found.append(slug)
    return set(found)


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

    def test_check_cells_are_folded(self, path):
        # The reader sees prose, key code and figures; checks run but fold away.
        # A cell whose statements are mostly checks (asserts, np.testing.*),
        # counted by lines, must carry hide-input or remove-input.
        unfolded = []
        for i, cell in enumerate(load(path)["cells"]):
            if cell["cell_type"] != "code" or tags(cell) & FOLDED:
                continue
            checks, total = line_counts(cell_tree(cell).body)
            if checks and checks >= CHECK_SHARE * total:
                unfolded.append((i, f"{checks} of {total} lines check"))
        assert not unfolded, (
            f"{path.name}: check cells without hide-input/remove-input: {unfolded}"
        )

    def test_keeps_its_checks(self, path):
        # Folding moved the checks out of sight, not out of the chapter.
        code = cells(load(path), "code")
        n_checks = sum(count_checks(cell_tree(c)) for c in code)
        assert n_checks >= MIN_CHECKS, (
            f"{path.name}: only {n_checks} asserts/np.testing checks"
        )
        folded = [c for c in code if tags(c) & FOLDED and count_checks(cell_tree(c))]
        assert folded, f"{path.name}: no folded check cell"

    def test_no_timing_asserts(self, path):
        # Runtime is policed by nbmake's timeout and the execution table, not by
        # asserts on a noisy machine inside the reading path.
        for i, cell in enumerate(cells(load(path), "code")):
            for node in ast.walk(cell_tree(cell)):
                if isinstance(node, ast.Assert):
                    text = ast.unparse(node)
                    assert "perf_counter" not in text and "time.time" not in text, (
                        f"{path.name}: code cell {i} asserts on wall time: {text}"
                    )

    def test_opens_with_why_it_matters(self, path):
        text = source(load(path)["cells"][0])
        title, _, rest = text.partition("\n")
        opening = rest.split("**What you will learn**")[0].strip()
        assert len(opening) >= 200, (
            f"{path.name}: open with a paragraph on why the chapter matters for "
            "the whole, before 'What you will learn'"
        )

    def test_ends_with_summary(self, path):
        last = source(cells(load(path), "markdown")[-1])
        assert last.startswith("## Summary"), (
            f"{path.name}: the last markdown cell must be '## Summary'"
        )
        for part in ("Derived", "Verified", "In the paper"):
            assert part in last, f"{path.name}: the summary lacks '{part}'"


def test_markdown_code_cells_are_narrow():
    # Ruff keeps the notebooks within book/ruff.toml's line length, so that no
    # code scrolls sideways in the built book; the code cells of the .md pages
    # (which ruff does not read) keep to the same limit.
    limit = tomllib.loads((BOOK / "ruff.toml").read_text())["line-length"]
    cell = re.compile(r"^```\{code-cell\}.*?\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
    wide = [
        (path.name, line)
        for path in sorted(BOOK.glob("*.md"))
        for body in cell.findall(path.read_text(encoding="utf-8"))
        for line in body.splitlines()
        if len(line) > limit
    ]
    assert not wide, f"code-cell lines longer than {limit} characters: {wide}"


def test_paper_map_names_exist():
    # Every `tvq.something` in the paper map resolves, submodules included.
    import tvq

    names = sorted(set(re.findall(r"`(tvq(?:\.\w+)+)`", PAPER_MAP.read_text())))
    assert names, "the paper map names no tvq function"
    missing = []
    for name in names:
        obj, parts = tvq, name.split(".")[1:]
        for i, part in enumerate(parts):
            if not hasattr(obj, part):
                module = ".".join(["tvq", *parts[: i + 1]])
                try:
                    importlib.import_module(module)
                except ImportError:
                    missing.append(name)
                    break
            obj = getattr(obj, part)
    assert not missing, f"paper map names that tvq lacks: {missing}"


def test_paper_map_links_exist():
    # Every book link of the paper map points at a page and a section it has.
    links = re.findall(
        r"\]\(([\w.-]+\.(?:ipynb|md))(?:#([\w-]+))?\)", PAPER_MAP.read_text()
    )
    assert links, "the paper map links no book section"
    broken = []
    for page, anchor in links:
        path = BOOK / page
        if not path.is_file():
            broken.append(page)
        elif anchor and anchor not in anchors(path):
            broken.append(f"{page}#{anchor}")
    assert not broken, f"paper map links to missing pages or sections: {broken}"


def test_section_links_in_chapters_exist():
    # Links of the form page.ipynb#section anywhere in the book hit a heading.
    broken = []
    for path in [*BOOK.glob("*.md"), *NOTEBOOKS]:
        if path.suffix == ".ipynb":
            text = "\n".join(source(c) for c in cells(load(path), "markdown"))
        else:
            text = path.read_text(encoding="utf-8")
        for page, anchor in re.findall(r"\]\(([\w.-]+\.(?:ipynb|md))#([\w-]+)\)", text):
            target = BOOK / page
            if not target.is_file() or anchor not in anchors(target):
                broken.append(f"{path.name} -> {page}#{anchor}")
    assert not broken, f"links to missing sections: {broken}"


# Constant checks: an assert (or np.testing.assert_*) whose two sides are
# literals, arithmetic on literals, or names bound once to such expressions.
# It can only fail if Python's arithmetic does, so it backs no claim.
CONSTANT_OPS = (ast.BinOp, ast.UnaryOp, ast.Tuple)  # not lists: they mutate
TESTS = ROOT / "tests"


def literal_names(tree):
    """Names bound exactly once in `tree`, each to a constant expression."""
    bound, values = {}, {}

    def bind(target, value):
        if isinstance(target, ast.Name):
            bound[target.id] = bound.get(target.id, 0) + 1
            values[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            same = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(
                target.elts
            )
            for i, elt in enumerate(target.elts):
                bind(elt, value.elts[i] if same else None)
        elif isinstance(target, ast.Starred):
            bind(target.value, None)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            bind(node.target, None)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            bind(node.target, None)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    bind(item.optional_vars, None)
        elif isinstance(node, ast.NamedExpr):
            bind(node.target, None)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                bound[arg.arg] = bound.get(arg.arg, 0) + 2
            for arg in (args.vararg, args.kwarg):
                if arg is not None:
                    bound[arg.arg] = bound.get(arg.arg, 0) + 2
            if not isinstance(node, ast.Lambda):
                bound[node.name] = bound.get(node.name, 0) + 2
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = (alias.asname or alias.name).split(".")[0]
                bound[name] = bound.get(name, 0) + 2
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound[node.name] = bound.get(node.name, 0) + 2
    constant = set()
    changed = True
    while changed:  # names bound to constants made of other such names
        changed = False
        for name, value in values.items():
            if (
                name not in constant
                and bound[name] == 1
                and value is not None
                and is_constant(value, constant)
            ):
                constant.add(name)
                changed = True
    return constant


def is_constant(node, names):
    """A literal, arithmetic on literals, or a name of `names`."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, CONSTANT_OPS):
        return all(
            is_constant(child, names)
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, (ast.operator, ast.unaryop, ast.expr_context))
        )
    return False


def constant_checks(tree):
    """Unparsed asserts of `tree` that compare two constant expressions."""
    names = literal_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            tests = [node.test]
        elif isinstance(node, ast.Call) and dotted_name(node.func).split(".")[
            -1
        ].startswith("assert_"):
            args = node.args[:2]
            if len(args) == 2 and all(is_constant(a, names) for a in args):
                found.append(ast.unparse(node))
            continue
        else:
            continue
        for test in tests:
            if is_constant(test, names):
                found.append(ast.unparse(node))
                break
            for compare in (n for n in ast.walk(test) if isinstance(n, ast.Compare)):
                sides = [compare.left, *compare.comparators]
                # An equality of two constants anywhere in a chain; an
                # ordering only when the whole chain is constant (a < 0.4 <
                # 0.99 < b still compares a and b).
                if all(is_constant(a, names) for a in sides) or any(
                    isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot))
                    and is_constant(a, names)
                    and is_constant(b, names)
                    for op, a, b in zip(compare.ops, sides, sides[1:], strict=False)
                ):
                    found.append(ast.unparse(node))
                    break
    return found


def notebook_tree(path):
    """One module of every parsable code cell of a notebook, in order."""
    body = []
    for cell in cells(load(path), "code"):
        body += cell_tree(cell).body
    return ast.Module(body=body, type_ignores=[])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_constant_checks_in_chapters(path):
    found = constant_checks(notebook_tree(path))
    assert not found, f"{path.name}: asserts that compare two constants: {found}"


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.stem)
def test_no_constant_checks_in_tests(path):
    found = constant_checks(ast.parse(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name}: asserts that compare two constants: {found}"


def test_constant_check_finder():
    # The finder flags literal comparisons and spares computed ones.
    flagged = [
        "assert 2 * 3 == 6",
        "assert x == 4 == 2 ** 2",
        "L = 12\nassert L / 3 == 4",
        "D, G = 8, 0.9\nnp.testing.assert_allclose((D - 1) * (1 - G), 0.7)",
        "assert -1 < 0",
    ]
    spared = [
        "assert f(2) == 4",
        "L = 12\nL = 13\nassert L / 3 == 4",
        "for n in (1, 2):\n    assert n < 3",
        "x = np.float32(2**24)\nassert x + 1 == x",
        "np.testing.assert_allclose(f(0.5), 0.95)",
        "def g(k=2):\n    assert k == 2",
    ]
    for code in flagged:
        assert constant_checks(ast.parse(code)), code
    for code in spared:
        assert not constant_checks(ast.parse(code)), code
