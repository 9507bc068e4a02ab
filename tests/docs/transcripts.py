"""Run the ```console transcripts of the docs and compare what they print (issue 14, point 9).

A transcript is a shell session: ``$ COMMAND`` lines, each followed by the output it printed
(stdout and stderr together, as on a terminal). The console blocks of one document run in order,
as one session, in a scratch folder: a later block sees the files, the current folder and the
shell variables an earlier one left. See tests/docs/test_doc_transcripts.py for the markers and
docs/architecture.md ("Testing") for how to write and regenerate a transcript.

The scratch folder ``ROOT`` stands for the file system root of the session: an absolute path in a
command under one of :data:`VIRTUAL_ROOTS` (``/vms``, ``/evidence``, ``/case``, ``/mnt``,
``/tmp``) is taken under ``ROOT``, and ``ROOT`` is removed from the output again (also in its
Windows forms ``Z:\\...`` and ``\\\\?\\Volume{...}\\...``), so the transcript shows ``/vms/...``.
Temporary files (``TMPDIR``, ``tempfile``) go to the session's ``/tmp`` too.

``vhdx`` commands run in this process (``vhdx.cli.main``: fast); everything else (``ls``,
``python3 script.py``, ``strace ... vhdx ...``, the part of a pipeline after ``vhdx``) runs in
``bash`` with a ``vhdx`` and a ``python3`` of this checkout first on ``PATH``.

What may differ between the transcript and a real run (the whole normalisation):

* ``...`` inside a line matches any text; a line that is only ``...`` matches any lines (none too);
* GUIDs match up to a consistent renaming over the whole document: the first time a GUID of the
  transcript meets one of the run they are paired, and from then on each stands for the other
  (also in later commands, so ``CP1=SRV01_<GUID>.avhdx`` names the file the run made);
* durations and rates (``in 0.07 s (76 MiB/s)``), ``ls -l`` owners and dates, and the random part
  of temporary names (``vhdx-demo-XXXXXXXX``) compare as equal whatever their values;
* trailing blanks, and blank lines at the end of a command's output, are ignored.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import vhdx.cli

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>[\w ]+?):\s*(?P<value>.*?)\s*-->\s*$")
GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
VIRTUAL_ROOTS = ("vms", "evidence", "case", "mnt", "tmp")
ABSOLUTE = re.compile(r"(?<![\w.:/\\-])/(?P<top>" + "|".join(VIRTUAL_ROOTS) + r")(?=/|\s|$|[\"'])")
VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)\}|(?P<name>\w+|\?))")
ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_]\w*)=(?P<value>\S*)$")
# What legitimately varies between runs: each pattern's matches compare equal whatever they are.
VOLATILE = [
    (re.compile(r"\b\d+\.\d+ s\b(?: \(\d+(?:\.\d+)? [KMGT]?i?B/s\))?"), "<duration>"),
    (re.compile(r"^(?P<blocks>\d+ +)?(?P<mode>[-dlcbps][-rwxsStT]{9}[.+@]?) +\d+ +\S+ +\S+ +(?P<size>\d+) +"
                r"\w{3} +\d+ +(?:\d\d:\d\d|\d{4}) "), r"\g<blocks>\g<mode> <links> <owner> <group> \g<size> <date> "),
    (re.compile(r"(vhdx-demo-|\.writing-|\.creating-)[\w]{6,}"), r"\1<random>"),
]


@dataclass
class Block:
    """One ```console block of a document."""

    doc: Path
    line: int                       # 1-based line of the opening fence
    first: int                      # 0-based index of the first body line
    end: int                        # 0-based index of the closing fence
    indent: str
    markers: dict[str, str]
    text: str                       # the body, dedented

    @property
    def name(self) -> str:
        """``doc.md:LINE``, for messages."""
        return f"{self.doc.name}:{self.line}"


def console_blocks(doc: Path) -> list[Block]:
    """Every ```console block of ``doc`` with the ``<!-- kind: value -->`` markers right above it."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if m["lang"] == "console":
            indent = m["indent"]
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:j]]
            found.append(Block(doc, i + 1, i + 1, j, indent, markers_above(lines, i), "\n".join(body)))
        i = j + 1
    return found


def markers_above(lines: list[str], index: int) -> dict[str, str]:
    """The ``<!-- kind: value -->`` lines directly above line ``index`` (blank lines between allowed)."""
    markers: dict[str, str] = {}
    k = index - 1
    while k >= 0 and (not lines[k].strip() or MARKER.match(lines[k])):
        m = MARKER.match(lines[k])
        if m is not None:
            markers.setdefault(m["kind"].strip(), m["value"])
        k -= 1
    return markers


@dataclass
class Step:
    """One ``$ command`` of a transcript and the output shown under it."""

    command: str
    shown: list[str]


def steps(text: str) -> list[Step]:
    """The commands of a transcript, each with the lines it shows."""
    found: list[Step] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            found.append(Step(line[2:], []))
        elif found:
            found[-1].shown.append(line)
        elif line.strip():
            raise ValueError(f"output before the first '$ ' command: {line!r}")
    return found


# --------------------------------------------------------------------------------------------
# Comparing output
# --------------------------------------------------------------------------------------------

def settle(line: str) -> str:
    """``line`` without trailing blanks and with its volatile parts replaced by placeholders."""
    line = line.rstrip()
    for pattern, replacement in VOLATILE:
        line = pattern.sub(replacement, line)
    return line


def match_line(want: str, got: str, guids: dict[str, str]) -> dict[str, str] | None:
    """The GUID pairs (shown -> real, lower case) under which ``want`` matches ``got``, or None."""
    want, got = settle(want), settle(got)
    pattern, names = [], []
    for piece in re.split(f"({GUID}|\\.\\.\\.)", want):
        if piece == "...":
            pattern.append(".*?")
        elif re.fullmatch(GUID, piece):
            known = guids.get(piece.lower())
            if known is not None:
                pattern.append(f"(?i:{re.escape(known)})")
            else:
                names.append(piece.lower())
                pattern.append(f"(?P<g{len(names) - 1}>{GUID})")
        else:
            pattern.append(re.escape(piece))
    m = re.fullmatch("".join(pattern), got)
    if m is None:
        return None
    new = dict(guids)
    taken = {v: k for k, v in guids.items()}
    for index, shown in enumerate(names):
        real = m[f"g{index}"].lower()
        if new.get(shown, real) != real or taken.get(real, shown) != shown:
            return None
        new[shown], taken[real] = real, shown
    return new


def match_lines(want: list[str], got: list[str], guids: dict[str, str]) -> dict[str, str] | None:
    """Like :func:`match_line` for whole outputs; a line ``...`` matches any number of lines."""
    if not want:
        return guids if not got else None
    if want[0].strip() == "...":
        for skip in range(len(got) + 1):
            result = match_lines(want[1:], got[skip:], guids)
            if result is not None:
                return result
        return None
    if not got:
        return None
    pairs = match_line(want[0], got[0], guids)
    return None if pairs is None else match_lines(want[1:], got[1:], pairs)


def regenerate(want: list[str], got: list[str], guids: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The output to write into the doc: the shown lines that still match, real output elsewhere.

    Shown lines are aligned with printed ones (a ``...`` line may stand for any number of them);
    a shown line that matches its printed line stays as it is, ``...`` lines stay, and printed
    lines that nothing shown matches are written out, with the run's GUIDs that are paired with
    one of the doc written as the doc's, so a regenerated transcript changes only where the
    output did.
    """
    result = match_lines(want, got, guids)
    if result is not None:
        return want, result
    out: list[str] = []
    steps = align(want, got, guids)
    guids = pair_replaced_lines(steps, want, got, guids)
    for kind, w, g in steps:
        if kind == "match":
            guids = match_line(want[w], got[g], guids) or guids
            out.append(want[w])
        elif kind == "ellipsis":
            if not out or out[-1] != want[w]:
                out.append(want[w])
        elif kind in ("printed", "replace"):
            out.append(rename_guids(got[g].rstrip(), {v: s for s, v in guids.items()}))
    return out, guids


def pair_replaced_lines(steps: list[tuple[str, int, int]], want: list[str], got: list[str],
                        guids: dict[str, str]) -> dict[str, str]:
    """``guids`` plus the pairs of GUIDs at the same places of replaced lines.

    Where a shown line was replaced by a printed one, the n-th GUID of the shown line is paired
    with the n-th GUID of the printed line (when both have as many and neither is paired yet),
    so the regenerated output keeps the doc's GUIDs for the same objects.
    """
    guids, taken = dict(guids), {v: k for k, v in guids.items()}
    for kind, w, g in steps:
        old, new = re.findall(GUID, want[w]) if kind == "replace" else [], re.findall(GUID, got[g])
        if kind != "replace" or len(old) != len(new):
            continue
        for a, b in zip(old, new):
            a, b = a.lower(), b.lower()
            if a not in guids and b not in taken:
                guids[a], taken[b] = b, a
    return guids


def align(want: list[str], got: list[str], guids: dict[str, str]) -> list[tuple[str, int, int]]:
    """The cheapest alignment of shown and printed lines.

    Steps: ("match", w, g) costs 0, ("ellipsis", w, g or -1) 0 (a ``...`` line absorbing printed
    lines), ("replace", w, g) 1, ("printed", -1, g) 1 (a new line), ("shown", w, -1) 2 (a line
    gone), so a changed line is preferably replaced in place.
    """
    n, m = len(want), len(got)
    ok = [[match_line(want[i], got[j], guids) is not None for j in range(m)] for i in range(n)]
    dots = [want[i].strip() == "..." for i in range(n)]
    moves = {"ellipsis-end": (1, 0, 0), "ellipsis": (0, 1, 0), "match": (1, 1, 0), "replace": (1, 1, 1),
             "printed": (0, 1, 1), "shown": (1, 0, 2)}

    def allowed(kind: str, i: int, j: int) -> bool:
        di, dj, _ = moves[kind]
        if i + di > n or j + dj > m or (kind != "printed" and i >= n):
            return False
        if kind.startswith("ellipsis"):
            return dots[i]
        if kind in ("match", "replace", "shown") and dots[i]:
            return False
        return kind != "match" or ok[i][j]

    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cost[n][m] = 0
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            for kind, (di, dj, c) in moves.items():
                if (di or dj) and allowed(kind, i, j):
                    cost[i][j] = min(cost[i][j], cost[i + di][j + dj] + c)
    steps, i, j = [], 0, 0
    while i < n or j < m:
        for kind, (di, dj, c) in moves.items():
            if allowed(kind, i, j) and cost[i][j] == cost[i + di][j + dj] + c:
                steps.append((kind.split("-")[0], i if di or kind != "printed" else -1, j if dj else -1))
                i, j = i + di, j + dj
                break
    return steps


def rename_guids(text: str, mapping: dict[str, str]) -> str:
    """``text`` with each GUID that ``mapping`` (lower case) knows replaced, keeping its case."""
    def swap(m: re.Match[str]) -> str:
        other = mapping.get(m[0].lower())
        if other is None:
            return m[0]
        return other.upper() if m[0].isupper() else other
    return re.sub(GUID, swap, text)


def trim(lines: list[str]) -> list[str]:
    """``lines`` without the blank lines at their end (a doc cannot show them before the fence)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------

@dataclass
class Session:
    """The state one document's transcripts share: scratch root, folder, variables, GUID pairs."""

    root: Path
    cwd: Path
    variables: dict[str, str] = field(default_factory=dict)
    guids: dict[str, str] = field(default_factory=dict)
    status: int = 0
    shims: Path | None = None          # default: ``root``/../shims, outside the session

    def to_real(self, text: str) -> str:
        """A command with the doc's GUIDs and absolute paths turned into this run's."""
        text = rename_guids(text, self.guids)
        return ABSOLUTE.sub(lambda m: f"{self.root}/{m['top']}", text)

    def to_shown(self, text: str) -> str:
        """Output with the scratch root taken out of every path (POSIX and Windows forms)."""
        posix = str(self.root)
        windows = posix.replace("/", "\\")
        for form in (windows.replace("\\", "\\\\"), windows, posix):
            text = text.replace(form, "")
        return text

    def expand(self, text: str) -> str:
        """``$NAME``, ``${NAME}`` and ``$?`` expanded outside single quotes."""
        parts = re.split(r"('[^']*')", text)

        def value(m: re.Match[str]) -> str:
            name = m["braced"] or m["name"]
            return str(self.status) if name == "?" else self.variables.get(name, os.environ.get(name, ""))
        return "".join(p if p.startswith("'") else VARIABLE.sub(value, p) for p in parts)

    def run(self, command: str) -> str:
        """Run one ``$`` line (``;`` and ``&&`` lists, ``|`` pipelines); the text it printed."""
        out = []
        for joiner, segment in split_list(self.to_real(command)):
            if joiner == "&&" and self.status != 0:
                continue
            out.append(self.run_segment(self.expand(segment).strip()))
        return self.to_shown("".join(out))

    def run_segment(self, segment: str) -> str:
        """One pipeline (or a ``cd``, or an assignment)."""
        words = shlex.split(segment, comments=True)
        assignment = ASSIGNMENT.match(segment.strip())
        if assignment is not None:
            self.variables[assignment["name"]] = assignment["value"]
            self.status = 0
            return ""
        if words and words[0] == "cd":
            target = self.cwd / (words[1] if len(words) > 1 else str(self.root))
            if not target.is_dir():
                self.status = 1
                return f"bash: cd: {words[1]}: No such file or directory\n"
            self.cwd, self.status = target.resolve(), 0
            return ""
        stages = split_pipeline(segment)
        if shlex.split(stages[0], comments=True)[:1] == ["vhdx"]:
            printed, self.status = self.vhdx_inprocess(shlex.split(stages[0], comments=True)[1:])
            if len(stages) > 1:
                printed, self.status = self.bash(" | ".join(stages[1:]), printed)
            return printed
        printed, self.status = self.bash(segment, None)
        return printed

    def vhdx_inprocess(self, argv: list[str]) -> tuple[str, int]:
        """``vhdx ARGV`` through ``vhdx.cli.main`` in this process, stdout and stderr as one stream."""
        buffer = io.BytesIO()
        stream = io.TextIOWrapper(buffer, encoding="utf-8", write_through=True)
        before, temp = Path.cwd(), tempfile.tempdir
        os.chdir(self.cwd)
        tempfile.tempdir = str(self.root / "tmp")     # the session's /tmp, whatever TMPDIR says
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                try:
                    code = vhdx.cli.main(argv)
                except SystemExit as e:            # argparse
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            os.chdir(before)
            tempfile.tempdir = temp
        stream.flush()
        return buffer.getvalue().decode("utf-8", "replace"), 0 if code is None else code

    def bash(self, script: str, stdin: str | None) -> tuple[str, int]:
        """``script`` in bash, in the session's folder, with its variables exported."""
        env = dict(os.environ, **self.variables)
        env["TMPDIR"] = str(self.root / "tmp")
        env["PATH"] = f"{self.shim_folder()}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=env, input=stdin, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, check=False)
        return done.stdout, done.returncode if done.returncode >= 0 else 128 - done.returncode

    def shim_folder(self) -> Path:
        """A folder with ``vhdx`` and ``python3`` of this checkout and interpreter."""
        if self.shims is None:
            self.shims = self.root.parent / "shims"
        if not (self.shims / "vhdx").exists():
            self.shims.mkdir(exist_ok=True)
            for name, command in (("python3", f'"{sys.executable}"'), ("vhdx", f'"{sys.executable}" -m vhdx')):
                script = self.shims / name
                script.write_text(f'#!/bin/sh\nexec {command} "$@"\n', encoding="utf-8")
                script.chmod(0o755)
        return self.shims


def split_list(command: str) -> list[tuple[str, str]]:
    """``a; b && c`` as ``[("", "a"), (";", "b"), ("&&", "c")]``, quotes respected."""
    parts, joiner, current, quote, i = [], "", [], "", 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            break
        elif ch == ";" or command.startswith("&&", i):
            parts.append((joiner, "".join(current)))
            joiner, current = (";", []) if ch == ";" else ("&&", [])
            i += 1 if ch == ";" else 2
            continue
        current.append(ch)
        i += 1
    parts.append((joiner, "".join(current)))
    return [(j, s) for j, s in parts if s.strip()]


def split_pipeline(segment: str) -> list[str]:
    """``a | b`` as ``["a", "b"]`` (quotes respected; ``||`` is not a pipe)."""
    parts, current, quote = [], [], ""
    for i, ch in enumerate(segment):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "|" and segment[i + 1:i + 2] != "|" and segment[i - 1:i] != "|":
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


# --------------------------------------------------------------------------------------------
# A document
# --------------------------------------------------------------------------------------------

Setup = Callable[[str, Session], None]
"""``setup(name, session)``: build the fixture ``name`` (a ``<!-- setup: name -->``) for the session."""


@dataclass
class Outcome:
    """What running a document's transcripts found."""

    failures: list[str] = field(default_factory=list)
    ran: int = 0
    not_run: list[str] = field(default_factory=list)
    new_text: str | None = None       # the document with regenerated transcripts (regen mode)


def run_document(doc: Path, root: Path, setup: Setup, regen: bool = False) -> Outcome:
    """Run every console block of ``doc`` in one session rooted at ``root``; compare or regenerate."""
    session = Session(root=root, cwd=root)
    (root / "tmp").mkdir(exist_ok=True)
    outcome = Outcome()
    lines = doc.read_text(encoding="utf-8").splitlines()
    replacements: list[tuple[Block, list[str]]] = []
    for block in console_blocks(doc):
        if "not run" in block.markers:
            outcome.not_run.append(f"{block.name}: {block.markers['not run']}")
            continue
        for name in block.markers.get("setup", "").split():
            setup(name, session)
        new_lines = run_block(block, session, outcome, regen)
        outcome.ran += 1
        replacements.append((block, new_lines))
    if regen:
        for block, new_lines in reversed(replacements):
            lines[block.first:block.end] = [f"{block.indent}{line}".rstrip() for line in new_lines]
        outcome.new_text = "\n".join(lines) + "\n"
    return outcome


def run_block(block: Block, session: Session, outcome: Outcome, regen: bool) -> list[str]:
    """Run one block's commands; record mismatches in ``outcome``; the block's regenerated lines."""
    new_lines: list[str] = []
    for step in steps(block.text):
        started = time.monotonic()
        printed = session.run(step.command)
        if os.environ.get("VHDX_DOCS_TIMING"):
            print(f"{time.monotonic() - started:6.2f} s  {block.name}  $ {step.command}", file=sys.stderr)
        got = trim(printed.splitlines())
        new_lines.append(f"$ {step.command}")
        if regen:
            shown, session.guids = regenerate(step.shown, got, session.guids)
            new_lines.extend(shown)
            continue
        pairs = match_lines(trim(step.shown), got, session.guids)
        if pairs is None:
            # the diff against what regen mode would write: the run's GUIDs shown as the doc's
            shown, session.guids = regenerate(step.shown, got, session.guids)
            diff = "\n".join(difflib.unified_diff(step.shown, shown, "shown", "printed", lineterm="", n=2))
            outcome.failures.append(f"{block.name}: `$ {step.command}` printed other output "
                                    f"(exit {session.status}; VHDX_DOCS_REGEN=1 rewrites it):\n{diff}")
        else:
            session.guids = pairs
        new_lines.extend(step.shown)
    return new_lines
