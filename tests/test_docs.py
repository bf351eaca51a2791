"""The docs stay true: README.md and docs/ are checked against the code and the committed results.

- every `diffspec …` command in a ```bash / ```sh / ```console block parses against the real CLI
  parser (nothing is run), and the methods it names exist;
- every results table quoted from `benchmarks/<suite>/table.md` (marked by a
  `<!-- table: benchmarks/<suite>/table.md -->` line right before it) equals a table of that file;
- README.md stays at most 250 lines, no page states a test count, and relative links resolve.

Fast, offline, no timing: it reads files and builds the argparse parser.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
MAX_README_LINES = 250
SHELL_FENCES = {"bash", "sh", "shell", "console"}
TABLE_MARKER = re.compile(r"^\s*<!--\s*table:\s*(\S+)\s*-->\s*$")


def doc_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# ----------------------------------------------------------------------------- shell blocks

def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) for every fenced shell block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang in SHELL_FENCES:
            blocks.append((i + 2, lines[i + 1:j]))
        i = j + 1
    return blocks


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join backslash continuations; drop `$ ` prompts; keep the line number where each starts."""
    out, buf, first = [], [], None
    for n, line in enumerate(lines, start):
        s = line.rstrip()
        if not buf:
            first = n
            s = re.sub(r"^\s*\$\s+", "", s)
        if s.endswith("\\"):
            buf.append(s[:-1])
            continue
        buf.append(s)
        out.append((first, " ".join(buf)))
        buf = []
    if buf:
        out.append((first, " ".join(buf)))
    return out


def _split_commands(line: str) -> list[list[str]]:
    """Tokens of each simple command on a shell line: split at &&, ||, |, ; and comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, cur = [], []
    for tok in lex:
        if tok and set(tok) <= set("|&;"):
            if cur:
                commands.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        commands.append(cur)
    return commands


def diffspec_argv(tokens: list[str]) -> list[str] | None:
    """The argv after `diffspec` for `[VAR=x …] diffspec …`, `python -m diffspec …` and
    `torchrun … -m diffspec …`; None for any other command (pip, curl, lm_eval, …)."""
    i = 0
    while i < len(tokens) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[i]):
        i += 1
    tokens = tokens[i:]
    if not tokens:
        return None
    if tokens[0] == "diffspec":
        return tokens[1:]
    for k in range(len(tokens) - 1):
        if tokens[k] == "-m" and tokens[k + 1] == "diffspec":
            return tokens[k + 2:]
    return None


def collect_commands() -> list[tuple[str, int, list[str]]]:
    found = []
    for path in doc_files():
        for start, block in shell_blocks(path.read_text()):
            pending, first = None, None  # a quoted string that runs over several lines (curl -d '{ … }')
            for n, line in logical_lines(start, block):
                if pending is not None:
                    line = pending + "\n" + line
                else:
                    first = n
                try:
                    commands = _split_commands(line)
                except ValueError:  # an open quote: the command goes on on the next line
                    pending = line
                    continue
                pending = None
                for tokens in commands:
                    argv = diffspec_argv(tokens)
                    if argv is not None:
                        found.append((_rel(path), first, argv))
            if pending is not None:  # the block ended inside a quote: a broken example
                found.append((_rel(path), first, ["__unparsable__", pending]))
    return found


COMMANDS = collect_commands()


def test_the_docs_show_diffspec_commands():
    # the collector itself works: the README alone shows generate, eval, bench and serve
    subcommands = {argv[0] for _, _, argv in COMMANDS if argv}
    assert {"generate", "eval", "bench", "serve", "train"} <= subcommands, subcommands


def _method_names() -> set[str]:
    from diffspec.methods import method_names

    return set(method_names())


@pytest.mark.parametrize("where, line, argv", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_command_parses_against_the_cli(where, line, argv):
    from diffspec.cli import build_parser

    assert argv and argv[0] != "__unparsable__", f"{where}:{line}: not a valid shell line: {argv[1:]}"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's own exit (e.g. --help, or a parser without our error hook)
        pytest.fail(f"{where}:{line}: `diffspec {shlex.join(argv)}` exits the parser ({e.code})")
    except ValueError as e:  # diffspec.cli.Parser raises UsageError (a ValueError) on a bad flag
        pytest.fail(f"{where}:{line}: `diffspec {shlex.join(argv)}` does not parse: {e}")
    known = _method_names()
    method = getattr(args, "method", None)
    if method is not None:
        assert method in known, f"{where}:{line}: unknown --method {method!r} (known: {sorted(known)})"
    for spec in getattr(args, "methods", None) or []:
        name = spec.partition(":")[0].strip()
        assert name in known, f"{where}:{line}: unknown method {name!r} in --methods spec {spec!r}"


# ----------------------------------------------------------------------------- quoted tables

def table_blocks(lines: list[str]) -> list[list[str]]:
    """Runs of consecutive lines starting with `|` (trailing spaces ignored)."""
    blocks, cur = [], []
    for line in lines + [""]:
        if line.lstrip().startswith("|"):
            cur.append(line.strip())
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks


def quoted_tables() -> list[tuple[str, int, str, list[str]]]:
    """(doc, marker line, source path, the table lines that follow the marker)."""
    quotes = []
    for path in doc_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = TABLE_MARKER.match(line)
            if not m:
                continue
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block = []
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                block.append(lines[j].strip())
                j += 1
            quotes.append((_rel(path), i + 1, m.group(1), block))
    return quotes


QUOTES = quoted_tables()


def test_some_tables_are_quoted():
    assert any(where == "README.md" for where, *_ in QUOTES), "the README's headline table has no table marker"


@pytest.mark.parametrize("where, line, source, block", QUOTES, ids=[f"{w}:{n}" for w, n, _, _ in QUOTES])
def test_quoted_table_equals_its_table_md(where, line, source, block):
    src = REPO_ROOT / source
    assert source.startswith("benchmarks/") and source.endswith("table.md"), \
        f"{where}:{line}: a table marker must name benchmarks/<suite>/table.md, not {source}"
    assert src.is_file(), f"{where}:{line}: {source} does not exist"
    assert block, f"{where}:{line}: no table follows the marker for {source}"
    tables = table_blocks(src.read_text().splitlines())
    if block in tables:
        return
    # say where it differs from the closest table of the file
    best = max(tables, key=lambda t: sum(a == b for a, b in zip(t, block)))
    diff = [(k, b, a) for k, (a, b) in enumerate(zip(best, block)) if a != b]
    detail = (f"first differing row {diff[0][0]}:\n  doc:  {diff[0][1]}\n  file: {diff[0][2]}" if diff
              else f"{len(block)} rows in the doc against {len(best)} in the file")
    pytest.fail(f"{where}:{line}: the table quoted from {source} is not that file's table; {detail}")


def test_every_results_page_quotes_its_suite():
    pages = sorted((DOCS / "results").glob("*.md"))
    assert pages, "docs/results/ has no pages"
    quoted = {(where, source) for where, _, source, _ in QUOTES}
    for page in pages:
        if page.name == "README.md":
            continue
        suite = REPO_ROOT / "benchmarks" / page.stem
        assert suite.is_dir(), f"{_rel(page)}: no benchmarks/{page.stem}/ folder for this page"
        if (suite / "table.md").is_file():
            source = f"benchmarks/{page.stem}/table.md"
            assert (_rel(page), source) in quoted, f"{_rel(page)} does not quote {source} under a table marker"


# ----------------------------------------------------------------------------- length, counts, links

def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it at most {MAX_README_LINES} (move detail to docs/)"


TEST_COUNT = re.compile(
    r"\b\d[\d,]*\s+(?:\w+\s+){0,2}tests\b"             # "1,114 tests", "32 CLI tests", "14–18 tests"
    r"|\b\d[\d,]*\s+(?:of them|passed|failed|skipped|deselected|selected)\b"  # "1,106 of them", "1139 passed"
    r"|\btests?\s*:\s*\d[\d,]*\b",                      # "tests: 1,114"
    re.IGNORECASE)


def test_counter_pattern_catches_test_counts():
    for bad in ["ran 1,114 tests", "(the tests: 6–10 min, 1,106 of them)", "all 32 CLI tests passed",
                "1139 passed, 25 skipped", "fails 14–18 tests"]:
        assert TEST_COUNT.search(bad), bad
    for fine in ["500 `arith` test problems", "200 GSM8K test questions", "the tests use one torch thread",
                 "a test checks the same on 50 problems"]:
        assert not TEST_COUNT.search(fine), fine


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_no_test_counts(path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = TEST_COUNT.search(line)
        assert not m, f"{_rel(path)}:{n}: {m.group(0)!r} is a test count; counts drift with every new test"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    return re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)  # code blocks are code


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation and symbols (`²`, `:`,
    `'`, backticks) dropped, spaces to hyphens, repeats numbered."""
    anchors: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(path), flags=re.M):
        slug = "".join(c for c in m.group(1).lower() if c.isalpha() or c in "0123456789 -_").replace(" ", "-")
        anchor, k = slug, 0
        while anchor in anchors:
            k += 1
            anchor = f"{slug}-{k}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_relative_links_resolve(path):
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (path.parent / file) if file else path
        assert dest.exists(), f"{_rel(path)}: link to {target} does not resolve"
        if anchor and dest.suffix == ".md":
            assert anchor in github_anchors(dest), f"{_rel(path)}: link to {target}: no heading makes #{anchor}"
