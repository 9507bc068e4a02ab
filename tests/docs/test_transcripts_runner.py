"""The transcript runner's own rules (tests/docs/transcripts.py): matching, GUID pairing, regen."""

from __future__ import annotations

from pathlib import Path

from docs.transcripts import Session, match_lines, regenerate, split_list, split_pipeline, steps

A = "d79026a8-0a96-46ae-8991-15bf3737a5c2"
B = "34ecadbc-ec14-4a0f-abfd-52b98c3c2f46"
X = "0766bfb3-4f83-45ca-9bc2-1c51b190a77f"
Y = "fa7a74d9-87dc-462c-89f8-348d49ef7872"


def test_ellipsis_matches_text_in_a_line_and_whole_lines() -> None:
    assert match_lines(["a ... z"], ["a anything z"], {}) == {}
    assert match_lines(["first", "...", "last"], ["first", "1", "2", "last"], {}) == {}
    assert match_lines(["first", "...", "last"], ["first", "last"], {}) == {}
    assert match_lines(["a ... z"], ["a anything y"], {}) is None
    assert match_lines(["first", "last"], ["first", "extra", "last"], {}) is None


def test_guids_match_up_to_a_consistent_renaming() -> None:
    pairs = match_lines([f"disk {A}", f"parent {B}"], [f"disk {X}", f"parent {Y}"], {})
    assert pairs == {A: X, B: Y}
    # the same shown GUID must stand for the same real one, and two shown GUIDs for two real ones
    assert match_lines([f"{A} {A}"], [f"{X} {Y}"], {}) is None
    assert match_lines([f"{A} {B}"], [f"{X} {X}"], {}) is None
    assert match_lines([f"{A}"], [f"{Y}"], {A: X}) is None
    # case does not matter (file names carry GUIDs in upper case)
    assert match_lines([f"SRV01_{A.upper()}.avhdx"], [f"SRV01_{X.upper()}.avhdx"], {}) == {A: X}


def test_volatile_parts_compare_equal() -> None:
    assert match_lines(["merged 5.1 MiB into x in 0.07 s (76 MiB/s)"],
                       ["merged 5.1 MiB into x in 1.93 s (3 MiB/s)"], {}) == {}
    assert match_lines(["-rw-r--r-- 1 root root 37748736 Nov 25 12:51 fixed.vhdx"],
                       ["-rw-r--r-- 1 ci ci 37748736 Jan  3 09:00 fixed.vhdx"], {}) == {}
    assert match_lines(["-rw-r--r-- 1 root root 37748736 Nov 25 12:51 fixed.vhdx"],
                       ["-rw-r--r-- 1 root root 37748737 Nov 25 12:51 fixed.vhdx"], {}) is None
    assert match_lines(["merged 5.1 MiB"], ["merged 5.2 MiB"], {}) is None


def test_regenerate_keeps_what_matches_and_writes_the_docs_guids() -> None:
    shown = [f"child {A}", "...", "size 1", "end"]
    printed = [f"child {X}", "noise", "size 2", "end"]
    out, pairs = regenerate(shown, printed, {})
    assert out == [f"child {A}", "...", "size 2", "end"]
    assert pairs == {A: X}
    # a changed line keeps the doc's GUID at the same place
    out, pairs = regenerate([f"created /vms/lab/APP01_{A.upper()}.avhdx"],
                            [f"created /tmp/lab/APP01_{X.upper()}.avhdx"], {})
    assert out == [f"created /tmp/lab/APP01_{A.upper()}.avhdx"] and pairs == {A: X}


def test_the_shell_pieces() -> None:
    assert split_list('vhdx check x; echo "exit $?"') == [("", "vhdx check x"), (";", ' echo "exit $?"')]
    assert split_list("a && b # c; d") == [("", "a "), ("&&", " b ")]
    assert split_list("python3 -c 'import a; print(1)'") == [("", "python3 -c 'import a; print(1)'")]
    assert split_pipeline("vhdx info x | grep -A5 'a|b'") == ["vhdx info x", "grep -A5 'a|b'"]
    assert steps("$ a\nout 1\n$ b\n") [0].shown == ["out 1"]


def test_a_session_maps_the_virtual_roots_and_hides_the_scratch_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "vms").mkdir(parents=True)
    session = Session(root=root, cwd=root)
    assert session.run("cd /vms") == ""
    assert session.cwd == (root / "vms").resolve()
    assert session.run("CP=x.avhdx") == "" and session.variables["CP"] == "x.avhdx"
    assert session.run("echo $CP; pwd") == "x.avhdx\n/vms\n"
    assert session.run("vhdx check missing.vhdx; echo \"exit $?\"").endswith("exit 1\n")
    assert session.to_shown(f"Z:{str(root).replace('/', chr(92))}\\vms\\a") == "Z:\\vms\\a"
