"""Every example of README.md and docs/*.md runs, so the docs cannot drift (issue 14, point 9).

* ```python blocks: the blocks of one file run in order, as one script, in an empty folder. A
  line's printed output is shown in a ``# -> OUTPUT`` comment, on the printing line or on the
  lines after it (``...`` matches anything, as in doctest; text after a further `` # `` is a
  remark). Everything a block prints must be shown, and everything shown must be printed.
* A block that cannot run here (it needs a real VM folder, a specimen, another package) is
  preceded by ``<!-- not run: WHY -->``; they are few.
* ```console blocks (shell sessions with their output) run too, and their output is compared:
  see tests/docs/test_doc_transcripts.py for how, and for their markers.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|setup):\s*(?P<why>.+?)\s*-->\s*$")
SHOWN = re.compile(r"#\s*->\s?(?P<out>.*)$")


def blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, language, marker kind or "", code) of every fenced block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or not m["lang"]:
            i += 1 if m is None else _skip_fence(lines, i)
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        before = [line for line in lines[:start] if line.strip()][-1:] or [""]
        marker = MARKER.match(before[0])
        found.append((start + 1, m["lang"], marker["kind"] if marker else "", textwrap.dedent("\n".join(body))))
    return found


def _skip_fence(lines: list[str], i: int) -> int:
    """How many lines a fenced block without a language takes (it is not an example)."""
    j = i + 1
    while j < len(lines) and lines[j].strip() != "```":
        j += 1
    return j - i + 1


def shown_output(code: str) -> str:
    """The output the ``# -> OUTPUT`` comments of ``code`` show, one line each."""
    out = []
    for line in code.splitlines():
        m = SHOWN.search(line)
        if m is not None:
            out.append(m["out"].split(" # ")[0].rstrip())
    return "".join(f"{line}\n" for line in out)


def python_files() -> list[Path]:
    """The docs with at least one ```python block that runs."""
    return [p for p in DOCS if any(lang == "python" and marker != "not run" for _, lang, marker, _ in blocks(p))]


@pytest.mark.parametrize("doc", python_files(), ids=lambda p: p.name)
def test_python_examples_run_and_print_what_they_show(doc: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    checker = doctest.OutputChecker()
    ran = 0
    for line, lang, marker, code in blocks(doc):
        if lang != "python" or marker == "not run":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{doc.name}:{line}: the example raised {type(e).__name__}: {e}") from e
        want = shown_output(code)
        assert checker.check_output(want, out.getvalue(), doctest.ELLIPSIS), \
            f"{doc.name}:{line}: the example printed\n{out.getvalue()}\nbut the doc shows\n{want}"
        ran += 1
    assert ran, f"{doc.name}: no example ran"


def test_few_python_examples_are_not_run() -> None:
    skipped = [(p.name, line) for p in DOCS for line, lang, marker, _ in blocks(p)
               if lang == "python" and marker == "not run"]
    assert len(skipped) <= 3, skipped


def test_python_blocks_need_a_marker_only_to_be_skipped() -> None:
    wrong = [(p.name, line, marker) for p in DOCS for line, lang, marker, _ in blocks(p)
             if lang == "python" and marker not in ("", "not run")]
    assert not wrong, wrong


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(block line, command) of every ``vhdx ...`` line in the ```sh blocks and the usage
    synopses (blocks without a language) of ``path``, continuation lines joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or m["lang"] not in ("", "sh"):
            i += 1 if m is None else 1 + _skip_fence(lines, i) - 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            line = lines[j].strip()
            if line.startswith("vhdx ") and "VERB" not in line:
                while j + 1 < len(lines) and lines[j + 1].startswith(" ") and lines[j + 1].strip().startswith("["):
                    j += 1
                    line += " " + lines[j].strip()
                found.append((i + 1, line))
            j += 1
        i = j + 1
    return found


def as_argv(command: str) -> list[str]:
    """A synopsis or shell line as arguments: comments, descriptions, redirections, ``[chain options]`` and
    brackets dropped, the first of ``a|b`` taken, ``N`` and ``SIZE`` given values."""
    command = re.sub(r"^(vhdx [\w-]+)\s+", r"\1 ", command)        # "vhdx map   DISK" (aligned)
    command = re.split(r"\s#\s|\s>\s|\s&&\s|\s{2,}", command)[0]     # 2 blanks: a description follows
    command = command.replace("[chain options]", "").replace("[", " ").replace("]", " ")
    typed = {"N": "1", "SIZE": "64M"}       # placeholders of options that take a number or a size
    return [typed.get(word, word.split("|")[0]) for word in command.split()[1:]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_command_lines_and_synopses_name_real_verbs_and_options(doc: Path) -> None:
    """The ```sh recipes and the synopses do not run, but what they name must exist."""
    import vhdx.cli     # noqa: PLC0415 (the CLI is only needed here)
    wrong = []
    for line, command in command_lines(doc):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                vhdx.cli.build_parser().parse_args(as_argv(command))
            except SystemExit as e:
                if e.code in (0, None):     # --version, --help
                    continue
                wrong.append(f"{doc.name}:{line}: {command}\n    {err.getvalue().strip().splitlines()[-1:]}")
    assert not wrong, "\n".join(wrong)


REPO_PATH = re.compile(r"(?<![\w/.-])(?:vhdx|tests|docs|benchmarks|fixtures|\.ci)/[\w./-]*[\w/]")
LINK = re.compile(r"\]\((?P<file>[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")


def anchors(path: Path) -> set[str]:
    """The GitHub anchors of ``path``'s headings (lower case, punctuation dropped, blanks to -)."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m is not None:
            out.add(re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_files_and_links_exist(doc: Path) -> None:
    """Every repository path a doc names exists, and every relative link and anchor resolves."""
    text = doc.read_text(encoding="utf-8")
    wrong = [f"path {p}" for p in sorted(set(REPO_PATH.findall(text))) if not (REPO / p.rstrip("/")).exists()]
    for m in LINK.finditer(text):
        if "://" in m["file"]:
            continue
        target = (doc.parent / m["file"]).resolve() if m["file"] else doc
        if not target.exists():
            wrong.append(f"link {m[0]}")
        elif m["anchor"] and target.suffix == ".md" and m["anchor"] not in anchors(target):
            wrong.append(f"anchor {m[0]}")
    assert not wrong, f"{doc.name}: {wrong}"
