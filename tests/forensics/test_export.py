"""`vhdx export` and `vhdx hash` against a model of every layer of a chain.

``export --layer N`` must write exactly the disk as of layer N (raw, sparse), ``--sha256`` must
print the hash of what was written, ``hash --layer N`` the same hash; an existing output is
refused without ``--force`` (and left untouched); ``-`` streams the whole disk to stdout.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from support.forensic_chain import (MiB, BuiltChain, LayerSpec, Op, build, run_inprocess, run_subprocess, sha256)

ZERO_STATE, UNMAPPED_STATE = 2, 3


def D(offset: int, length: int, seed: int = 0) -> Op:
    return Op("data", offset, length, seed or (offset * 13 + length))


def Z(offset: int, length: int) -> Op:
    return Op("zero", offset, length)


def S(block: int, state: int) -> Op:
    return Op("state", block, 0, state)


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    lo, hi = 0, len(got)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    return f"first difference at byte {lo}: got {got[lo:lo + 8].hex()}, want {want[lo:lo + 8].hex()}"


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: {first_difference(got, want)}")


def chain_512(folder: Path) -> BuiltChain:
    """Four layers on a mostly empty 40 MiB disk; later layers zero and unmap earlier data."""
    size = 40 * MiB
    return build(folder, size=size, sector_size=512, layers=[
        LayerSpec(1 * MiB, [D(0, 3 * MiB + 100), D(20 * MiB + 7, 5000), D(size - 512, 512)]),
        LayerSpec(2 * MiB, [D(1000, 3000), Z(2 * MiB, 2 * MiB),          # zeroes base data (whole block)
                            D(30 * MiB, 2 * MiB), S(5, UNMAPPED_STATE)]),
        LayerSpec(4 * MiB, [D(20 * MiB + 4000, 2000), Z(512 * 3, 512 * 2), S(9, ZERO_STATE)]),
        LayerSpec(1 * MiB, [D(3 * MiB - 1, 2), D(31 * MiB + 333, 777), S(2, UNMAPPED_STATE),
                            D(2 * MiB + 512 * 9, 512)]),               # data into an UNMAPPED block
    ])


def chain_4096(folder: Path) -> BuiltChain:
    size = 24 * MiB + 4096 * 3
    return build(folder, size=size, sector_size=4096, layers=[
        LayerSpec(4 * MiB, [D(5, 4096 * 5), D(size - 10, 10)]),
        LayerSpec(1 * MiB, [D(4096 * 2 + 1, 100), Z(0, MiB)]),            # zeros over the base's data
        LayerSpec(2 * MiB, [D(12 * MiB - 4096, 8192), D(size - 4096 * 3, 4096 * 3)]),
    ])


CHAINS = {"512": chain_512, "4096": chain_4096}


@pytest.fixture(scope="module", params=sorted(CHAINS))
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BuiltChain:
    """Built once per module and never written to afterwards (tests that change files copy them)."""
    return CHAINS[request.param](tmp_path_factory.mktemp(f"chain{request.param}"))


def _sha_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("sha256 ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[1]


def test_export_every_layer_equals_the_model(chain: BuiltChain, tmp_path: Path) -> None:
    leaf = chain.leaf
    n = len(chain.layers)
    for k in range(n):
        want = chain.contents[chain.layer_index_from_leaf(k)]
        out = tmp_path / f"layer{k}.raw"
        result = run_inprocess("export", leaf, out, "--layer", k, "--sha256")
        assert result.returncode == 0, result.describe()
        got = out.read_bytes()
        assert_bytes(got, want, f"export --layer {k}")
        st = os.stat(out)
        assert st.st_size == chain.size
        if chain.size >= 24 * MiB:
            assert st.st_blocks * 512 < chain.size, \
                f"export --layer {k} is not sparse: {st.st_blocks * 512} bytes allocated of {chain.size}"
        printed = _sha_line(result.stdout)
        assert printed == hashlib.sha256(got).hexdigest() == sha256(want), f"--sha256 of layer {k}"

        hashed = run_inprocess("hash", leaf, "--layer", k)
        assert hashed.returncode == 0, hashed.describe()
        assert hashed.stdout.split()[0] == printed, f"hash --layer {k}"
        as_json = run_inprocess("hash", leaf, "--layer", k, "--json").json()
        assert as_json["sha256"] == printed and as_json["layer"] == k and as_json["virtual_size"] == chain.size


def test_export_of_each_file_on_its_own_equals_its_layer(chain: BuiltChain, tmp_path: Path) -> None:
    """Opening a middle layer directly gives the same disk as reaching it with --layer."""
    for i, layer in enumerate(chain.layers):
        out = tmp_path / f"own{i}.raw"
        result = run_inprocess("export", layer.path, out, "--json", "--sha256")
        summary = result.json()
        assert summary["layer"] == 0 and summary["virtual_size"] == chain.size
        assert summary["sha256"] == sha256(chain.contents[i])
        assert summary["bytes_written"] <= chain.size
        assert_bytes(out.read_bytes(), chain.contents[i], f"export {layer.path.name}")


def test_export_is_sparse_on_a_mostly_empty_disk(tmp_path: Path) -> None:
    size = 128 * MiB
    chain = build(tmp_path / "chain", size=size, sector_size=512, layers=[
        LayerSpec(32 * MiB, [D(100 * MiB + 3, 4096)]),
        LayerSpec(2 * MiB, [D(120 * MiB, 512), Z(100 * MiB, 2 * MiB)]),   # hides the base's data
        LayerSpec(2 * MiB, [D(7, 7)]),
    ])
    out = tmp_path / "out.raw"
    result = run_inprocess("export", chain.leaf, out, "--json", "--sha256")
    summary = result.json()
    st = os.stat(out)
    assert st.st_size == size
    assert st.st_blocks * 512 <= 16 * MiB, f"{st.st_blocks * 512} bytes allocated for 2 sectors of data"
    assert summary["sha256"] == sha256(chain.contents[-1])
    assert summary["bytes_written"] <= 16 * MiB
    assert_bytes(out.read_bytes(), chain.contents[-1], "sparse export")


def test_export_refuses_an_existing_output_without_force(chain: BuiltChain, tmp_path: Path) -> None:
    out = tmp_path / "exists.raw"
    garbage = b"\xa5" * (chain.size + 3 * MiB + 17)       # longer than the disk, and not zeros
    out.write_bytes(garbage)
    before = os.stat(out).st_mtime_ns
    result = run_inprocess("export", chain.leaf, out)
    assert result.returncode != 0, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vhdx: error:") and str(out) in lines[0] and "--force" in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert out.read_bytes() == garbage and os.stat(out).st_mtime_ns == before, "the refused output was changed"

    result = run_inprocess("export", chain.leaf, out, "--force", "--sha256")
    assert result.returncode == 0, result.describe()
    got = out.read_bytes()
    assert_bytes(got, chain.contents[-1], "export --force over a longer file of 0xa5")
    assert _sha_line(result.stdout) == sha256(got)


def test_export_of_a_layer_the_chain_lacks_is_an_error_and_writes_nothing(chain: BuiltChain,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "nothing.raw"
    for verb in (["export", chain.leaf, out], ["hash", chain.leaf]):
        result = run_inprocess(*verb, "--layer", len(chain.layers))
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), result.stderr
        assert str(chain.leaf) in lines[0]
    assert not out.exists()


def test_export_to_stdout_streams_the_whole_disk(chain: BuiltChain) -> None:
    result = run_subprocess("export", chain.leaf, "-", "--sha256", text=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert_bytes(result.stdout, chain.contents[-1], "export -")
    stderr = result.stderr.decode()
    assert _sha_line(stderr) == sha256(chain.contents[-1]), stderr
    assert "Traceback" not in stderr

    result = run_subprocess("export", chain.leaf, "-", "--layer", 1, text=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert_bytes(result.stdout, chain.contents[-2], "export - --layer 1")


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_export_of_an_orphan_over_zeros(name: str, tmp_path: Path) -> None:
    """With its parent gone, a checkpoint exports only what it holds (with --missing-parent zeros)."""
    chain = CHAINS[name](tmp_path / "chain")
    gone = chain.layers[-2].path
    gone.rename(gone.with_name(gone.name + ".gone"))          # not a .vhdx/.avhdx any more
    leaf = chain.leaf
    out = tmp_path / "orphan.raw"
    refused = run_inprocess("export", leaf, out)
    assert refused.returncode != 0 and not out.exists(), refused.describe()
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error:") and str(leaf) in lines[0], refused.stderr
    result = run_inprocess("export", leaf, out, "--missing-parent", "zeros", "--sha256")
    assert result.returncode == 0, result.describe()
    want = chain.own_over_zeros(len(chain.layers) - 1)
    assert_bytes(out.read_bytes(), want, "orphan over zeros")
    hashed = run_inprocess("hash", leaf, "--missing-parent", "zeros", "--json").json()
    assert hashed["sha256"] == _sha_line(result.stdout) == sha256(want)

    # --parent chains the orphan back to its renamed parent: the full disk again
    full = tmp_path / "reunited.raw"
    result = run_inprocess("export", leaf, full, "--parent", gone.with_name(gone.name + ".gone"))
    assert result.returncode == 0, result.describe()
    assert_bytes(full.read_bytes(), chain.contents[-1], "export --parent")


@pytest.mark.parametrize("target", ["the-leaf-itself", "a-symlink-to-the-leaf", "a-hardlink-to-the-base",
                                    "the-parent-layer"])
def test_export_force_never_overwrites_a_file_of_the_chain(target: str, tmp_path: Path) -> None:
    """``export CHILD X --force`` where X is (a link to) a file being read must refuse: O_TRUNC
    would destroy the evidence and the export would read the zeros it just made."""
    chain = tiny_chain(tmp_path / "chain")
    leaf, parent, base = chain.layers[-1].path, chain.layers[-2].path, chain.layers[0].path
    if target == "the-leaf-itself":
        out = leaf
    elif target == "a-symlink-to-the-leaf":
        out = tmp_path / "link.raw"
        out.symlink_to(leaf)
    elif target == "a-hardlink-to-the-base":
        out = tmp_path / "hard.raw"
        os.link(base, out)
    else:
        out = parent
    before = {p: p.read_bytes() for p in chain.paths}
    result = run_inprocess("export", leaf, out, "--force")
    after = {p: p.read_bytes() for p in chain.paths}
    changed = [p.name for p in chain.paths if before[p] != after[p]]
    assert not changed, f"export --force to {target} overwrote {changed} (exit {result.returncode})"
    assert result.returncode != 0, result.describe()
    assert_one_line = result.stderr.splitlines()
    assert len(assert_one_line) == 1 and assert_one_line[0].startswith("vhdx: error:"), result.stderr


def tiny_chain(folder: Path) -> BuiltChain:
    return build(folder, size=4 * MiB, sector_size=512, layers=[
        LayerSpec(1 * MiB, [D(0, 70000)]), LayerSpec(1 * MiB, [D(MiB + 5, 100)]), LayerSpec(2 * MiB, [D(9, 9)])])


def test_export_to_dev_null_works_or_names_it(tmp_path: Path) -> None:
    """/dev/null (a character device: no ftruncate) either takes the export or the one-line error
    names it; "vhdx: error: Invalid argument" alone does not tell the user what went wrong."""
    chain = tiny_chain(tmp_path / "chain")
    result = run_inprocess("export", chain.leaf, "/dev/null", "--force")
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), result.stderr
        assert "/dev/null" in lines[0], f"the error does not name the output: {lines[0]!r}"


def test_export_to_a_fifo_streams_or_names_it(tmp_path: Path) -> None:
    """A named pipe cannot take pwrite: either the whole disk comes through it in order, or the
    one-line error names it."""
    import threading

    chain = tiny_chain(tmp_path / "chain")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = bytearray()

    def reader() -> None:
        with open(fifo, "rb") as handle:
            while chunk := handle.read(1 << 20):
                received.extend(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    result = run_inprocess("export", chain.leaf, fifo, "--force")
    if result.returncode != 0:
        try:                                    # release the reader if the export never opened the pipe
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    thread.join(timeout=30)
    if result.returncode == 0:
        assert_bytes(bytes(received), chain.contents[-1], "export to a FIFO")
    else:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), result.stderr
        assert str(fifo) in lines[0], f"the error does not name the output: {lines[0]!r}"
