"""The command line as a user meets it: help, version, exit codes, one-line errors, sizes.

Most cases call ``vhdx.cli.main`` in this process (a Python start costs ~0.5 s here); the ones
about the process itself (the ``vhdx`` script, ``python -m vhdx``, tracebacks) run a real one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.needs import unavailable

import vhdx

from support.forensic_chain import REPO, cli_env, run_inprocess

MiB = 1 << 20
GiB = 1 << 30

# every verb and what its --help must mention
VERBS = {
    "info": ["path", "--json", "--search", "--parent", "--missing-parent", "--ignore-id-mismatch"],
    "check": ["path", "--json", "--search", "--missing-parent"],
    "chain": ["path", "--json", "--search", "--parent"],
    "map": ["path", "--layer", "--json", "--png", "--missing-parent"],
    "diff": ["child", "--json", "--missing-parent"],
    "export": ["path", "out", "--layer", "--sha256", "--json", "--force", "--missing-parent"],
    "hash": ["path", "--layer", "--json", "--missing-parent"],
    "create": ["path", "size", "--parent", "--block-size", "--logical-sector-size", "--fixed", "--json"],
    "snapshot": ["disk", "--block-size", "--json"],
    "reparent": ["child", "--parent", "--ignore-id-mismatch", "--json"],
    "orphans": ["folder", "--json", "--merge", "--yes", "--recursive"],
    "merge": ["child", "--into", "--keep", "--force", "--dry-run", "--json"],
    "demo": ["--dir"],
}


def vhdx_script() -> str:
    beside = Path(sys.executable).with_name("vhdx")
    if beside.is_file():
        return str(beside)
    found = shutil.which("vhdx")
    if not found:
        unavailable("the vhdx console script is not installed (pip install -e .)")
    return found


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([vhdx_script(), *map(str, args)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=120)


def run_module(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(stderr: str, *, names: str | os.PathLike[str] | None = None, what: str = "") -> str:
    assert "Traceback" not in stderr, f"{what}: traceback without --debug:\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"{what}: error is not one line:\n{stderr}"
    assert lines[0].startswith("vhdx: error:"), f"{what}: {lines[0]!r}"
    if names is not None:
        assert os.fspath(names) in lines[0], f"{what}: the error does not name {names}: {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dynamic disk with one write, never changed by the tests."""
    path = tmp_path_factory.mktemp("cli") / "small.vhdx"
    with vhdx.create(path, 8 * MiB, block_size=MiB) as d:
        d.seek(MiB + 5)
        d.write(b"cli test data")
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, disk: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    files = {}
    text = folder / "notes.vhdx"
    text.write_text("this is not a virtual disk\n" * 40000)     # ~1 MiB of text
    files["text"] = text
    noise = folder / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 20)
    files["noise"] = noise
    data = disk.read_bytes()
    payload = 4 * MiB      # header section, log, metadata, BAT: 1 MiB each; the written block next
    assert len(data) > payload + MiB // 2
    for name, length in (("header-only", 200_000), ("no-bat", 3 * MiB + 12345), ("cut-payload", payload + 1000)):
        cut = folder / f"{name}.vhdx"
        cut.write_bytes(data[:length])
        files[name] = cut
    return files


# --------------------------------------------------------------------------------------------
# help and version
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_that_names_its_arguments(verb: str) -> None:
    result = run_inprocess(verb, "--help")
    assert result.returncode == 0, result.describe()
    assert result.stdout.startswith(f"usage: vhdx {verb}"), result.stdout[:200]
    for word in VERBS[verb]:
        assert word in result.stdout, f"vhdx {verb} --help does not mention {word}:\n{result.stdout}"
    assert result.stderr == ""


def test_top_level_help_lists_every_verb() -> None:
    result = run_inprocess("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout, f"vhdx --help does not list {verb}"
    assert "--version" in result.stdout and "--debug" in result.stdout


def test_version_from_the_script_and_the_module() -> None:
    for run in (run_script, run_module):
        result = run("--version")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"vhdx {vhdx.__version__}"


def test_python_m_vhdx_behaves_like_the_script(disk: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.vhdx"
    for args in (["info", "--json", disk], ["map", "--json", disk], ["check", missing], ["info"]):
        a, b = run_script(*args), run_module(*args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args


# --------------------------------------------------------------------------------------------
# exit codes and one-line errors
# --------------------------------------------------------------------------------------------

READ_VERBS = {"info": 1, "check": 1, "chain": 1, "map": 1, "diff": 1, "hash": 1}


@pytest.mark.parametrize("verb", sorted(READ_VERBS))
def test_a_nonexistent_file(verb: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "missing.vhdx"
    result = run_inprocess(verb, missing)
    assert result.returncode == READ_VERBS[verb], result.describe()
    assert result.stdout == ""
    assert_one_line_error(result.stderr, names=missing, what=f"{verb} of a missing file")


@pytest.mark.parametrize("argv", [["snapshot", "{m}"], ["merge", "{m}"], ["merge", "{m}", "--dry-run"],
                                  ["reparent", "{m}", "--parent", "{disk}"], ["orphans", "{missing_dir}"],
                                  ["create", "{new}", "--parent", "{m}"], ["export", "{m}", "{new}"]],
                         ids=lambda a: a[0] + ("-dry-run" if "--dry-run" in a else ""))
def test_other_verbs_on_a_nonexistent_file(argv: list[str], disk: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.avhdx"
    values = dict(m=missing, disk=disk, missing_dir=tmp_path / "no-such-folder", new=tmp_path / "new.vhdx")
    args = [a.format(**values) for a in argv]
    result = run_inprocess(*args)
    assert result.returncode == 1, result.describe()
    named = values["missing_dir"] if argv[0] == "orphans" else missing
    assert_one_line_error(result.stderr, names=named, what=" ".join(argv))
    assert not (tmp_path / "new.vhdx").exists()


def test_a_nonexistent_file_in_a_real_process(tmp_path: Path) -> None:
    missing = tmp_path / "missing.vhdx"
    for verb, code in (("info", 1), ("check", 1)):
        result = run_script(verb, missing)
        assert result.returncode == code, result.stderr
        assert_one_line_error(result.stderr, names=missing, what=verb)
    result = run_script("export", missing, tmp_path / "out.raw")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, names=missing, what="export of a missing file")
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("kind", ["text", "noise"])
def test_a_file_that_is_not_a_vhdx(kind: str, bad_files: dict[str, Path], tmp_path: Path) -> None:
    path = bad_files[kind]
    before = path.read_bytes()
    for verb, code in (("info", 1), ("check", 1), ("chain", 1), ("map", 1), ("diff", 1), ("hash", 1)):
        result = run_inprocess(verb, path)
        assert result.returncode == code, result.describe()
        assert_one_line_error(result.stderr, names=path, what=f"{verb} of a {kind} file")
    result = run_inprocess("export", path, tmp_path / "out.raw")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, names=path, what="export")
    assert not (tmp_path / "out.raw").exists(), "a failed export left an output file"
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["header-only", "no-bat"])
def test_a_vhdx_cut_before_its_bat(kind: str, bad_files: dict[str, Path]) -> None:
    """check: 1 = the check could not be completed, the file cannot be opened as a VHDX at all (as
    qemu-img check): one line on stderr saying why (--json still prints the report); every other
    verb: a one-line error naming the file."""
    path = bad_files[kind]
    result = run_inprocess("check", path)
    assert result.returncode == 1, result.describe()
    assert_one_line_error(result.stderr, names=path, what="check of a truncated file")
    assert "too short" in result.stderr or "past the end" in result.stderr, result.stderr
    as_json = run_inprocess("check", "--json", path)
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["errors"] >= 1 and report["opened"] is False
    for verb in ("info", "map", "hash", "chain", "diff"):
        result = run_inprocess(verb, path)
        assert result.returncode == 1, result.describe()
        assert_one_line_error(result.stderr, names=path, what=f"{verb} of a truncated file")


def test_a_vhdx_cut_inside_a_payload_block(bad_files: dict[str, Path]) -> None:
    """It opens, so check judges it: exit 2 (corruption, as qemu-img check), errors found, the block
    running past the end named."""
    path = bad_files["cut-payload"]
    result = run_inprocess("check", path)
    assert result.returncode == 2, result.describe()
    assert re.search(r"\d+ errors? found", result.stdout) and result.stderr == ""
    report = json.loads(run_inprocess("check", "--json", path).stdout)
    assert report["opened"] is True and report["errors"] >= 1
    assert any("past the end" in f["message"] for f in report["findings"]), report


def test_check_exit_codes_on_a_good_disk(disk: Path) -> None:
    result = run_inprocess("check", disk)
    assert result.returncode == 0 and "no errors" in result.stdout, result.describe()


def test_check_exit_3_for_leaked_space_only(disk: Path, tmp_path: Path) -> None:
    """Space past the last referenced structure is a leak: exit 3 as qemu-img check (wasted space,
    no harm to data); with an error as well, the corruption wins (2); warnings alone stay 0."""
    leaky = tmp_path / "leaky.vhdx"
    leaky.write_bytes(disk.read_bytes() + bytes(3 * MiB))
    result = run_inprocess("check", leaky)
    assert result.returncode == 3, result.describe()
    assert re.search(r"^leak .*past the last", result.stdout, re.M) and "1 leak" in result.stdout, result.stdout
    report = json.loads(run_inprocess("check", "--json", leaky).stdout)
    assert report["errors"] == 0 and report["leaks"] == 1, report
    assert [f["severity"] for f in report["findings"]] == ["leak"], report
    assert "3145728 bytes" in report["findings"][0]["message"]

    ragged = tmp_path / "ragged.vhdx"  # less than the 1 MiB alignment past the end: no leak
    ragged.write_bytes(disk.read_bytes() + bytes(512))
    assert run_inprocess("check", ragged).returncode == 0

    broken = tmp_path / "broken.vhdx"
    data = bytearray(disk.read_bytes())
    data[3 * MiB] = 4  # BAT entry 0 (the BAT follows header section, log and metadata): reserved state 4
    broken.write_bytes(data + bytes(3 * MiB))
    result = run_inprocess("check", broken)
    assert result.returncode == 2 and "reserved BAT state" in result.stdout, result.describe()


def test_check_help_names_the_exit_codes() -> None:
    text = " ".join(run_inprocess("check", "--help").stdout.split())
    for words in ("0 when", "1 when", "2 when", "3 when", "qemu-img check"):
        assert words in text, text


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["info"], ["export", "x.vhdx"], ["map", "x.vhdx", "--layer", "one"],
    ["create", "x.vhdx", "12Q"], ["create", "x.vhdx", "64M", "--logical-sector-size", "1024"],
    ["diff"], ["reparent", "child.avhdx"], ["info", "x.vhdx", "--no-such-option"],
    ["check", "x.vhdx", "--missing-parent", "maybe"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_inprocess(*argv)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("vhdx"), result.stderr
    assert "error:" in result.stderr.splitlines()[-1]
    assert not list(tmp_path.iterdir()), "a usage error created a file"


def test_debug_shows_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.vhdx"
    result = run_script("--debug", "info", missing)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("vhdx: error:")
    assert str(missing) in result.stderr.splitlines()[-1]
    plain = run_script("info", missing)
    assert "Traceback" not in plain.stderr


@pytest.mark.parametrize("layer", ["-1", "5"])
def test_a_layer_outside_the_chain_is_refused(disk: Path, tmp_path: Path, layer: str) -> None:
    """map, export and hash agree: --layer must name a layer of the chain (0 .. depth-1)."""
    out = tmp_path / "out.raw"
    for argv in (["map", "--json", disk], ["export", disk, out], ["hash", disk]):
        result = run_inprocess(*argv, "--layer", layer)
        assert result.returncode != 0, f"vhdx {' '.join(map(str, argv))} --layer {layer} was accepted:\n" \
                                       f"{result.stdout}"
        assert_one_line_error(result.stderr, names=disk, what=f"{argv[0]} --layer {layer}")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# create: sizes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,size", [("64M", 64 * MiB), ("1G", GiB), ("1GiB", GiB), ("512", 512),
                                       ("3m", 3 * MiB), ("2MB", 2 * MiB), ("1.5K", 1536), ("64T", 64 << 40)])
def test_create_accepts_sizes(text: str, size: int, tmp_path: Path) -> None:
    path = tmp_path / "new.vhdx"
    result = run_inprocess("create", path, text, "--json")
    created = result.json()
    assert created["size"] == size and created["type"] == "dynamic"
    info = run_inprocess("info", "--json", path).json()
    assert info["virtual_size"] == size
    assert run_inprocess("check", path).returncode == 0
    assert os.stat(path).st_size < 64 * MiB


def test_create_options(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.vhdx"
    made = run_inprocess("create", fixed, "4M", "--fixed", "--block-size", "1M", "--logical-sector-size", "4096",
                         "--json").json()
    assert made["type"] == "fixed" and made["block_size"] == MiB and made["logical_sector_size"] == 4096
    child = tmp_path / "child.avhdx"
    made = run_inprocess("create", child, "--parent", fixed, "--json").json()
    assert made["type"] == "differencing" and made["size"] == 4 * MiB
    chain = run_inprocess("chain", "--json", child).json()
    assert len(chain["layers"]) == 2
    text = run_inprocess("create", tmp_path / "plain.vhdx", "10M")
    assert text.returncode == 0 and text.stdout.startswith("created ")


@pytest.mark.parametrize("argv,code", [
    (["12Q"], 2), (["-5M"], 2), (["abc"], 2), (["1.3"], 2), (["M"], 2), ([""], 2),
    # sizes that parse but make no disk are usage errors too (vhdx.UsageError): exit 2
    (["0"], 2), (["1000"], 2), (["65T"], 2), (["64M", "--block-size", "3M"], 2),
    (["64M", "--block-size", "512M"], 2), (["64M", "--block-size", "512K"], 2),
    ([], 2),                                         # neither a size nor --parent
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_create_rejects_bad_sizes_and_leaves_no_file(argv: list[str], code: int, tmp_path: Path) -> None:
    path = tmp_path / "bad.vhdx"
    result = run_inprocess("create", path, *argv)
    assert result.returncode == code, result.describe()
    if code == 1:
        assert_one_line_error(result.stderr, names=path, what=f"create {argv}")
    else:
        assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert not path.exists(), "a refused create left a file behind"


def test_create_refuses_to_overwrite(disk: Path) -> None:
    before = disk.read_bytes()
    result = run_inprocess("create", disk, "4M")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, names=disk, what="create over an existing file")
    assert disk.read_bytes() == before


def test_a_broken_pipe_is_quiet(disk: Path) -> None:
    """``vhdx export DISK - | head -c 10``: no traceback when the reader goes away."""
    proc = subprocess.Popen([vhdx_script(), "export", str(disk), "-"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr, stderr
