"""Every ```console transcript of README.md and docs/*.md runs, and prints what it shows.

How a transcript is run (details in tests/docs/transcripts.py):

* The console blocks of one document form one shell session, run in order in a scratch folder
  that stands for ``/``: ``/vms``, ``/evidence``, ``/case``, ``/mnt`` and ``/tmp`` in a command
  are folders of the scratch folder, and the scratch folder is taken out of the output again.
  Current folder, shell variables (``CP1=...``) and files carry over from block to block.
* Each ``$ COMMAND`` line runs (``vhdx`` in this process, anything else in bash with this
  checkout's ``vhdx`` and ``python3`` first on PATH; ``;``, ``&&``, ``|`` and ``$VAR`` work) and
  its output (stdout and stderr together) must match the lines under it, up to this
  normalisation: ``...`` in a line matches any text, a line ``...`` matches any lines; GUIDs
  match up to a consistent renaming over the document (a GUID the doc shows stands for the one
  the run printed in its place, in later commands too); durations and rates, ``ls -l`` owners
  and dates, and the random part of temporary names are ignored; so are trailing blanks.

Markers, on the lines right above a ```console block (several may be stacked):

* ``<!-- setup: NAME [NAME...] -->`` builds fixtures before the block runs: the files the
  transcript assumes (a chain with checkpoints, an orphan folder, a dirty-log specimen...).
  The builders are in tests/support/doc_fixtures.py (``FIXTURES``); add one there for a new
  situation. Files the transcript makes itself (``vhdx create``, ``mkdir``) need no fixture.
* ``<!-- not run: WHY -->`` leaves a block out, only where running it in a test is impossible
  (a Windows command, a VM). Few are allowed (see the count test below).

A block without a marker runs. To rewrite the transcripts from real output after a change of
what a command prints, run this test with ``VHDX_DOCS_REGEN=1``; it rewrites the output lines that
no longer match (keeping the doc's GUIDs, and every line that still matches, ``...`` included),
then fails once so that the change is reviewed with ``git diff docs/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from support.doc_fixtures import FIXTURES
from support.needs import unavailable
from support.scratch import scratch_folder
from docs.transcripts import Session, console_blocks, run_document

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
REGEN = os.environ.get("VHDX_DOCS_REGEN") == "1"
MAX_NOT_RUN = 3
PEERS = ("strace", "qemu-img", "vhdiinfo")     # the tools beyond coreutils that transcripts run


def docs_with_transcripts() -> list[Path]:
    """The docs with at least one console block."""
    return [doc for doc in DOCS if console_blocks(doc)]


@pytest.mark.parametrize("doc", docs_with_transcripts(), ids=lambda p: p.name)
def test_transcripts_print_what_they_show(doc: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with contextlib.contextmanager(scratch_folder)(tmp_path, "vhdx-docs-") as scratch:
        root = scratch / "root"
        root.mkdir()
        check_document(doc, root, request)


def check_document(doc: Path, root: Path, request: pytest.FixtureRequest) -> None:
    """Run ``doc``'s transcripts in ``root``; fail on a difference (or rewrite them, in regen mode)."""
    missing = sorted(tool for tool in PEERS if tool in doc.read_text(encoding="utf-8") and not shutil.which(tool))
    if missing:
        message = f"{doc.name}: its transcripts run {', '.join(missing)}, not installed"
        unavailable(message)

    def setup(name: str, session: Session) -> None:
        assert name in FIXTURES, f"{doc.name}: no fixture {name!r} in tests/support/doc_fixtures.py"
        FIXTURES[name](session.root, lambda specimen: request.getfixturevalue("specimen")(specimen))

    outcome = run_document(doc, root, setup, regen=REGEN)
    if REGEN:
        assert outcome.new_text is not None
        if outcome.new_text != doc.read_text(encoding="utf-8"):
            doc.write_text(outcome.new_text, encoding="utf-8")
            pytest.fail(f"{doc.name}: transcripts regenerated; review `git diff {doc.relative_to(REPO)}`")
        return
    assert not outcome.failures, "\n\n".join(outcome.failures)
    assert outcome.ran, f"{doc.name}: no transcript ran"


def test_every_marker_is_known_and_few_blocks_are_not_run() -> None:
    unknown, not_run = [], []
    for doc in DOCS:
        for block in console_blocks(doc):
            unknown += [f"{block.name}: {kind}" for kind in block.markers if kind not in ("setup", "not run")]
            unknown += [f"{block.name}: setup {name}" for name in block.markers.get("setup", "").split()
                        if name not in FIXTURES]
            if "not run" in block.markers:
                not_run.append(block.name)
    assert not unknown, f"unknown markers or fixtures: {unknown}"
    assert len(not_run) <= MAX_NOT_RUN, f"console blocks not run: {not_run}"
