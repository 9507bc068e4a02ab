"""Real Hyper-V/Windows (and one QEMU-made) disks, judged by ``shared/specimens/manifest.json``.

The expected values come from the manifest, which records what qemu-img 7.2 and libvhdi read
from these files; never from our own earlier output. Headers and BAT entries written by a
log replay are re-read here with a few lines of independent parsing (signature, CRC-32C,
sequence number), so the check does not trust the library under test.

Provenance of every file: ``shared/specimens/README.md``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import crcmod.predefined
import pytest

import vhdx
from support.shared import manifest_entries, no_shared_param

MiB = 1 << 20
ZERO_GUID = uuid.UUID(int=0)


# --------------------------------------------------------------------------------------------
# Parametrisation from the manifest (collection time; conftest.py does the skip at run time)
# --------------------------------------------------------------------------------------------

ENTRIES = manifest_entries()


def _short(stored_name: str) -> str:
    for suffix in (".gz", ".bz2", ".zip"):
        if stored_name.endswith(suffix):
            return stored_name[: -len(suffix)]
    return stored_name


def _is_lvm2(entry: dict[str, Any]) -> bool:
    # 580 MiB unzipped and a 10 GiB virtual disk: everything about it is slow.
    return "lvm2" in entry["file"]


def _full_hash_is_slow(entry: dict[str, Any]) -> bool:
    # A full-disk hash reads the whole virtual size (about 1.4 GB/s for SHA-256 here). The
    # swap disk (10 GiB) stays in the normal run as the representative large disk; the QEMU
    # dirty-log disk (10 GiB) is hashed three times over, so its full hashes are slow and a
    # fast pattern test covers it in the normal run.
    return _is_lvm2(entry) or "qemu-made" in entry["file"]


def _params(select: Callable[[dict[str, Any]], bool],
            slow: Callable[[dict[str, Any]], bool] = _is_lvm2) -> list[Any]:
    if ENTRIES is None:
        return [no_shared_param()]
    params = []
    for entry in ENTRIES:
        if select(entry):
            marks = [pytest.mark.slow] if slow(entry) else []
            params.append(pytest.param(entry["file"], id=_short(entry["file"]), marks=marks))
    return params


def _not_differencing(entry: dict[str, Any]) -> bool:
    return not entry["has_parent"]


def _dirty(entry: dict[str, Any]) -> bool:
    return bool(entry["log_dirty"])


NON_DIFFERENCING = _params(_not_differencing)
NON_DIFFERENCING_FULL_HASH = _params(_not_differencing, slow=_full_hash_is_slow)
DIRTY = _params(_dirty)
DIRTY_FULL_HASH = _params(_dirty, slow=_full_hash_is_slow)

ORPHAN = "dissect-hypervisor-differencing-8G-orphan.avhdx.gz"
QEMU_DIRTY = "qemu-iotests-dirtylog-10G-qemu-made.vhdx.bz2"
WINDOWS_DIRTY = "discutils-win10-dirtylog-dynamic-1G.vhdx.zip"


# --------------------------------------------------------------------------------------------
# Independent parsing of headers and the BAT (docs/format.md §1.5, §2, §3, §5)
# --------------------------------------------------------------------------------------------

_crc32c = crcmod.predefined.mkCrcFun("crc-32c")
BAT_REGION_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
PAYLOAD_STATE_NAMES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED",
                       6: "FULLY_PRESENT", 7: "PARTIALLY_PRESENT"}


def _valid_headers(path: Path) -> list[dict[str, Any]]:
    """Both header slots (64 KiB, 128 KiB) that have the signature and a correct CRC-32C."""
    headers = []
    with open(path, "rb") as handle:
        for file_offset in (0x10000, 0x20000):
            handle.seek(file_offset)
            raw = handle.read(4096)
            if raw[:4] != b"head":
                continue
            stored = int.from_bytes(raw[4:8], "little")
            if _crc32c(raw[:4] + bytes(4) + raw[8:]) != stored:
                continue
            headers.append({
                "offset": file_offset,
                "sequence_number": int.from_bytes(raw[8:16], "little"),
                "file_write_guid": uuid.UUID(bytes_le=raw[16:32]),
                "data_write_guid": uuid.UUID(bytes_le=raw[32:48]),
                "log_guid": uuid.UUID(bytes_le=raw[48:64]),
            })
    return headers


def _current_header(path: Path) -> dict[str, Any]:
    headers = _valid_headers(path)
    assert headers, f"{path}: no header with a valid signature and CRC-32C"
    return max(headers, key=lambda header: header["sequence_number"])


def _payload_states(path: Path, entry: dict[str, Any]) -> list[int]:
    """The state of each payload block as stored in the file, using the manifest's geometry."""
    with open(path, "rb") as handle:
        handle.seek(0x30000)
        table = handle.read(65536)
        assert table[:4] == b"regi"
        assert _crc32c(table[:4] + bytes(4) + table[8:]) == int.from_bytes(table[4:8], "little")
        bat_offset = None
        for index in range(int.from_bytes(table[8:12], "little")):
            raw = table[16 + 32 * index: 48 + 32 * index]
            if uuid.UUID(bytes_le=raw[:16]) == BAT_REGION_GUID:
                bat_offset = int.from_bytes(raw[16:24], "little")
        assert bat_offset is not None, "no BAT region"
        handle.seek(bat_offset)
        bat = handle.read(8 * entry["bat_entries"])
    chunk_ratio = entry["chunk_ratio"]
    states = []
    for bat_index in range(entry["bat_entries"]):
        if bat_index % (chunk_ratio + 1) == chunk_ratio:
            continue  # a sector-bitmap slot (docs/format.md §5.2)
        states.append(int.from_bytes(bat[8 * bat_index: 8 * bat_index + 8], "little") & 7)
    return states[: entry["payload_blocks"]]


def _payload_state_counts(path: Path, entry: dict[str, Any]) -> Counter:
    return Counter(PAYLOAD_STATE_NAMES.get(state, f"reserved {state}")
                   for state in _payload_states(path, entry))


def _file_state(path: Path, file_sha256: Callable[[Path], str]) -> tuple[str, int, int]:
    stat = path.stat()
    return file_sha256(path), stat.st_size, stat.st_mtime_ns


# --------------------------------------------------------------------------------------------
# Every non-differencing specimen
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NON_DIFFERENCING_FULL_HASH)
def test_virtual_disk_sha256_matches_manifest(name, specimen, manifest_entry, sha256_of_disk):
    entry = manifest_entry(name)
    with vhdx.open(specimen(name)) as disk:
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"], \
            entry["sha256_of_virtual_disk_means"]


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_geometry_and_guids_match_manifest(name, specimen, manifest_entry):
    entry = manifest_entry(name)
    path = specimen(name)
    with vhdx.open(path) as disk:
        assert disk.size == entry["virtual_size"]
        assert disk.block_size == entry["block_size"]
        assert disk.logical_sector_size == entry["logical_sector_size"]
        assert disk.physical_sector_size == entry["physical_sector_size"]
        assert disk.disk_id == uuid.UUID(entry["virtual_disk_id_page83"])
        assert disk.data_write_guid == uuid.UUID(entry["current_header"]["data_write_guid"])
        assert Path(disk.path) == path


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_info_is_a_json_serialisable_dict_with_the_main_sections(name, specimen):
    with vhdx.open(specimen(name)) as disk:
        info = disk.info()
    assert isinstance(info, dict)
    assert {"headers", "region_table", "metadata", "bat", "log"} <= set(info)
    assert json.loads(json.dumps(info)) == info


def _assert_info_matches_manifest(info: dict[str, Any], entry: dict[str, Any]) -> None:
    """The structural facts of ``Disk.info()`` against the manifest's (same names)."""
    assert info["creator"] == entry["creator_field"]
    assert info["disk_type"] == entry["disk_type"]
    assert info["virtual_size"] == entry["virtual_size"]
    assert info["disk_id"] == entry["virtual_disk_id_page83"]
    headers = [{"offset": header["offset"], "valid": header["valid"],
                "sequence_number": header.get("sequence_number"),
                "data_write_guid": header.get("data_write_guid"),
                "log_guid": header.get("log_guid")} for header in info["headers"]]
    assert headers == [{"offset": header["offset"], "valid": header["checksum_ok"],
                        "sequence_number": header["sequence_number"],
                        "data_write_guid": header["data_write_guid"],
                        "log_guid": header["log_guid"]} for header in entry["headers"]]
    current = [header for header in info["headers"] if header["current"]]
    assert len(current) == 1
    assert current[0]["sequence_number"] == entry["current_header"]["sequence_number"]
    assert info["headers_identical"] == entry["headers_identical_sequence"]
    fields = ("region", "file_offset", "length", "required")
    assert [{key: region[key] for key in fields} for region in info["region_table"]] == \
        [{key: region[key] for key in fields} for region in entry["region_tables"][0]["entries"]]
    fields = ("item", "offset", "length", "is_user", "is_virtual_disk", "is_required")
    assert [{key: item[key] for key in fields} for item in info["metadata"]["entries"]] == \
        [{key: item[key] for key in fields} for item in entry["metadata_items"]]
    metadata = info["metadata"]
    assert metadata["leave_block_allocated"] == entry["leave_block_allocated"]
    assert metadata["has_parent"] == entry["has_parent"]
    bat = info["bat"]
    assert bat["chunk_ratio"] == entry["chunk_ratio"]
    assert bat["payload_blocks"] == entry["payload_blocks"]
    assert bat["entries"] == entry["bat_entries"]
    # A read-only open of a dirty file replays the log in memory: the BAT it reports is the
    # replayed one, which the manifest took from qemu-img's replay on a copy.
    expected_states = entry.get("bat_payload_states_after_qemu_replay") or entry["bat_payload_states"]
    assert bat["payload_states"] == expected_states
    assert bat["sector_bitmap_states"] == entry["bat_sector_bitmap_states"]
    assert info["log"]["dirty"] == entry["log_dirty"]
    assert info["log"]["log_guid"] == entry["current_header"]["log_guid"]


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_info_agrees_with_the_manifest(name, specimen, manifest_entry):
    with vhdx.open(specimen(name)) as disk:
        _assert_info_matches_manifest(disk.info(), manifest_entry(name))


@pytest.mark.parametrize("name", NON_DIFFERENCING_FULL_HASH)
def test_read_only_open_full_read_and_info_leave_the_file_unchanged(
        name, specimen, manifest_entry, sha256_of_disk, file_sha256):
    entry = manifest_entry(name)
    path = specimen(name)
    before = _file_state(path, file_sha256)
    assert before[0] == entry["sha256_of_decompressed_vhdx"]
    with vhdx.open(path, "r") as disk:
        disk.info()
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]
        disk.info()
    assert _file_state(path, file_sha256) == before


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_read_only_open_refuses_writes(name, specimen, file_sha256):
    path = specimen(name)
    before = _file_state(path, file_sha256)
    with vhdx.open(path) as disk:
        assert not disk.writable()
        with pytest.raises(vhdx.ReadOnlyError):
            disk.write(b"x" * 512)
    assert _file_state(path, file_sha256) == before


def _read_exact(disk, virtual_offset: int, length: int) -> bytes:
    disk.seek(virtual_offset)
    buffer = bytearray(length)
    done = 0
    while done < length:
        count = disk.readinto(memoryview(buffer)[done:])
        assert count, f"short read at {virtual_offset + done}"
        done += count
    return bytes(buffer)


def _unaligned_extents(entry: dict[str, Any], states: list[int], seed: int) -> list[tuple[int, int]]:
    """Reads that straddle the edges of present blocks, sectors and 4 MiB windows."""
    rng = random.Random(seed)
    size, block_size = entry["virtual_size"], entry["block_size"]
    present = [block for block, state in enumerate(states) if state in (6, 7)]
    edges = [0, size]
    for block in rng.sample(present, min(6, len(present))):
        edges += [block * block_size, min(size, (block + 1) * block_size)]
    extents = []
    for edge in edges:
        for before, after in ((1, 1), (511, 513), (4096 + 7, 3), (300_000, 5), (5, 1 * MiB + 3)):
            start, stop = max(0, edge - before), min(size, edge + after)
            if start < stop:
                extents.append((start, stop - start))
    for _ in range(10):
        length = rng.randrange(1, 3 * MiB)
        start = rng.randrange(0, size - length)
        extents.append((start, length))
    return extents


def _check_unaligned_reads(disk, entry: dict[str, Any], states: list[int], seed: int) -> None:
    window = 4 * MiB  # the aligned reads of the hash tests, which the manifest vouches for
    size = entry["virtual_size"]
    for start, length in _unaligned_extents(entry, states, seed):
        window_start = start // window * window
        window_stop = min(size, -(-(start + length) // window) * window)
        aligned = b"".join(_read_exact(disk, offset, min(window, window_stop - offset))
                           for offset in range(window_start, window_stop, window))
        got = _read_exact(disk, start, length)
        assert got == aligned[start - window_start: start - window_start + length], \
            f"read of {length} bytes at virtual offset {start}"


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_unaligned_reads_agree_with_the_aligned_reads(name, specimen, manifest_entry):
    entry = manifest_entry(name)
    path = specimen(name)
    states = _payload_states(path, entry)
    with vhdx.open(path) as disk:
        _check_unaligned_reads(disk, entry, states, seed=len(name))


def test_reads_clip_at_the_virtual_size(specimen, manifest_entry):
    # dynamic-10M: 10 MiB of virtual disk inside one 32 MiB block (README: "reads must clip").
    name = "dissect-hypervisor-dynamic-10M-32Mblock.vhdx.gz"
    size = manifest_entry(name)["virtual_size"]
    with vhdx.open(specimen(name)) as disk:
        disk.seek(size - 100)
        assert len(disk.read(4096)) == 100
        assert disk.read(4096) == b""
        disk.seek(size + 12345)
        assert disk.read(10) == b""


def test_hyperv2012_known_pattern(specimen):
    # qemu iotest 064: 0xa5 for 0-33 MiB, 0x96 for 33-66 MiB, zeros after (README).
    with vhdx.open(specimen("qemu-iotests-hyperv2012-dynamic-1G-32Mblock.vhdx.bz2")) as disk:
        for virtual_offset, expected in ((0, 0xA5), (33 * MiB - 1, 0xA5), (33 * MiB, 0x96),
                                         (66 * MiB - 1, 0x96), (66 * MiB, 0), (1023 * MiB, 0)):
            disk.seek(virtual_offset)
            assert disk.read(1) == bytes([expected]), hex(virtual_offset)
        disk.seek(32 * MiB - 700)  # a read across the first block boundary
        assert disk.read(1400) == b"\xa5" * 1400


# --------------------------------------------------------------------------------------------
# Dirty logs: in-memory replay for "r", replay onto the file for "r+"
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIRTY)
def test_read_only_open_of_a_dirty_log_keeps_the_log_guid(name, specimen, manifest_entry):
    entry = manifest_entry(name)
    path = specimen(name)
    with vhdx.open(path) as disk:
        disk.seek(0)
        disk.read(1 * MiB)
    header = _current_header(path)
    assert header["log_guid"] == uuid.UUID(entry["current_header"]["log_guid"]) != ZERO_GUID


def _open_modes(path: Path) -> list[int]:
    """O_ACCMODE of every descriptor this process holds on ``path`` (Linux /proc)."""
    modes = []
    for fd_link in Path("/proc/self/fd").iterdir():
        try:
            if Path(os.readlink(fd_link)) != path:
                continue
            flags_line = next(line for line in (Path("/proc/self/fdinfo") / fd_link.name)
                              .read_text().splitlines() if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        modes.append(int(flags_line.split()[1], 8) & os.O_ACCMODE)
    return modes


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", DIRTY + _params(lambda entry: "coreos" in entry["file"]))
def test_read_only_open_holds_the_file_o_rdonly(name, specimen):
    path = specimen(name).resolve()
    with vhdx.open(path) as disk:
        disk.seek(0)
        disk.read(4096)
        modes = _open_modes(path)
    assert modes, "no descriptor open on the file while the disk is open"
    assert set(modes) == {os.O_RDONLY}
    assert _open_modes(path) == [], "descriptors left open after close()"


def test_qemu_dirty_log_pattern_after_in_memory_replay(specimen):
    # qemu iotest 070: 0xa5 for 0-18 MiB after replay, only 0-17 MiB without (README).
    with vhdx.open(specimen(QEMU_DIRTY)) as disk:
        disk.seek(0)
        data = disk.read(20 * MiB)
    assert data[: 18 * MiB] == b"\xa5" * (18 * MiB)
    assert data[18 * MiB:] == bytes(2 * MiB)


def test_windows_dirty_log_holds_an_mbr_after_in_memory_replay(specimen):
    # README: before replay every block is NOT_PRESENT; after it the disk holds an MBR.
    with vhdx.open(specimen(WINDOWS_DIRTY)) as disk:
        disk.seek(0)
        sector = disk.read(512)
    assert sector[510:512] == b"\x55\xaa"
    partition_types = [sector[446 + 16 * index + 4] for index in range(4)]
    assert sum(1 for partition_type in partition_types if partition_type) == 2


def _replay_copy(name: str, specimen_copy: Callable[[str], Path]) -> Path:
    path = specimen_copy(name)
    with vhdx.open(path, "r+"):
        pass
    return path


@pytest.mark.parametrize("name", DIRTY)
def test_rw_open_replays_the_log_and_clears_log_guid(name, specimen_copy, manifest_entry,
                                                      interop_tool):
    entry = manifest_entry(name)
    path = _replay_copy(name, specimen_copy)
    header = _current_header(path)
    assert header["log_guid"] == ZERO_GUID
    # Replay is not a change a reader can see: DataWriteGuid (what children link to) stays;
    # FileWriteGuid is renewed before anything in the file changes (docs/format.md §2.3).
    assert header["data_write_guid"] == uuid.UUID(entry["current_header"]["data_write_guid"])
    assert header["file_write_guid"] != uuid.UUID(entry["current_header"]["file_write_guid"])
    assert header["sequence_number"] > entry["current_header"]["sequence_number"]
    assert _payload_state_counts(path, entry) == Counter(entry["bat_payload_states_after_qemu_replay"])

    qemu_img = interop_tool("qemu-img")
    result = subprocess.run([qemu_img, "check", "-f", "vhdx", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout


@pytest.mark.parametrize("name", DIRTY_FULL_HASH)
def test_rw_replayed_copy_reads_the_manifest_sha256(name, specimen_copy, manifest_entry,
                                                     sha256_of_disk):
    entry = manifest_entry(name)
    path = _replay_copy(name, specimen_copy)
    with vhdx.open(path) as disk:
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]


@pytest.mark.parametrize("name", DIRTY_FULL_HASH)
def test_rw_replayed_copy_converted_by_qemu_img_has_the_manifest_sha256(
        name, specimen_copy, manifest_entry, interop_tool, file_sha256, tmp_path):
    entry = manifest_entry(name)
    path = _replay_copy(name, specimen_copy)
    raw = tmp_path / "converted.raw"
    qemu_img = interop_tool("qemu-img")
    result = subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(path), str(raw)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert raw.stat().st_size == entry["virtual_size"]
    assert file_sha256(raw) == entry["sha256_of_virtual_disk"]


def test_rw_replayed_qemu_dirty_log_shows_the_replayed_pattern(specimen_copy):
    path = _replay_copy(QEMU_DIRTY, specimen_copy)
    with vhdx.open(path) as disk:
        disk.seek(17 * MiB)
        data = disk.read(2 * MiB)
    assert data[: MiB] == b"\xa5" * MiB
    assert data[MiB:] == bytes(MiB)


# --------------------------------------------------------------------------------------------
# The orphan differencing disk (a Hyper-V checkpoint whose parent is not available)
# --------------------------------------------------------------------------------------------

ORPHAN_PARENT_LINKAGE = uuid.UUID("ff34003b-11ed-4cf8-a166-b2be05e20b80")


def test_orphan_without_its_parent_raises_parent_not_found(specimen):
    path = specimen(ORPHAN)
    with pytest.raises(vhdx.ParentNotFoundError) as excinfo:
        vhdx.open(path)
    error = excinfo.value
    assert isinstance(error, FileNotFoundError)
    assert isinstance(error, vhdx.ChainError)
    assert error.tried, "ParentNotFoundError.tried should list the paths tried"


def test_orphan_over_zeros_reads_the_manifest_sha256(specimen, manifest_entry, sha256_of_disk,
                                                    file_sha256):
    entry = manifest_entry(ORPHAN)
    path = specimen(ORPHAN)
    before = _file_state(path, file_sha256)
    with vhdx.open(path, missing_parent="zeros") as disk:
        assert disk.size == entry["virtual_size"]
        assert disk.block_size == entry["block_size"]
        assert disk.logical_sector_size == entry["logical_sector_size"]
        assert disk.physical_sector_size == entry["physical_sector_size"]
        assert disk.disk_id == uuid.UUID(entry["virtual_disk_id_page83"])
        assert disk.data_write_guid == uuid.UUID(entry["current_header"]["data_write_guid"])
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]
    assert _file_state(path, file_sha256) == before


def test_orphan_unaligned_reads_agree_with_the_aligned_reads(specimen, manifest_entry):
    # The present data sits in PARTIALLY_PRESENT blocks: reads across their edges mix
    # sector-bitmap runs from the child with zeros from the missing parent.
    entry = manifest_entry(ORPHAN)
    path = specimen(ORPHAN)
    states = _payload_states(path, entry)
    assert states.count(7) == entry["bat_payload_states"]["PARTIALLY_PRESENT"]
    with vhdx.open(path, missing_parent="zeros") as disk:
        _check_unaligned_reads(disk, entry, states, seed=83)


def test_orphan_parent_locator_entries_match_manifest(specimen, manifest_entry):
    entry = manifest_entry(ORPHAN)
    with vhdx.open(specimen(ORPHAN), missing_parent="zeros") as disk:
        info = disk.info()
    assert json.loads(json.dumps(info)) == info
    assert info["metadata"]["parent_locator"] == entry["parent_locator"]


def test_orphan_info_agrees_with_the_manifest(specimen, manifest_entry):
    with vhdx.open(specimen(ORPHAN), missing_parent="zeros") as disk:
        _assert_info_matches_manifest(disk.info(), manifest_entry(ORPHAN))


def _empty_parent(tmp_path: Path, manifest_entry) -> Path:
    entry = manifest_entry(ORPHAN)
    parent = tmp_path / "empty-parent.vhdx"
    with vhdx.create(parent, entry["virtual_size"], block_size=entry["block_size"],
                     logical_sector_size=entry["logical_sector_size"],
                     physical_sector_size=entry["physical_sector_size"]):
        pass
    return parent


def test_orphan_over_an_empty_parent_with_a_different_guid_is_a_mismatch(
        specimen, manifest_entry, tmp_path):
    parent = _empty_parent(tmp_path, manifest_entry)
    with pytest.raises(vhdx.ParentMismatchError) as excinfo:
        vhdx.open(specimen(ORPHAN), parents=[parent])
    assert uuid.UUID(str(excinfo.value.expected)) == ORPHAN_PARENT_LINKAGE


def test_orphan_over_an_empty_parent_ignoring_the_id_mismatch_reads_the_manifest_sha256(
        specimen, manifest_entry, sha256_of_disk, tmp_path):
    entry = manifest_entry(ORPHAN)
    parent = _empty_parent(tmp_path, manifest_entry)
    with vhdx.open(specimen(ORPHAN), parents=[parent], ignore_id_mismatch=True) as disk:
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]


def _patch_data_write_guid(path: Path, guid: uuid.UUID) -> None:
    """Set DataWriteGuid in every valid header and re-stamp its CRC-32C, as the manifest's
    authors did for libvhdi (independent of the library under test)."""
    with open(path, "r+b") as handle:
        for header in _valid_headers(path):
            handle.seek(header["offset"])
            raw = bytearray(handle.read(4096))
            raw[32:48] = guid.bytes_le
            raw[4:8] = bytes(4)
            raw[4:8] = _crc32c(bytes(raw)).to_bytes(4, "little")
            handle.seek(header["offset"])
            handle.write(raw)
    assert _current_header(path)["data_write_guid"] == guid


def test_orphan_over_an_empty_parent_whose_guid_matches_the_linkage_reads_the_manifest_sha256(
        specimen, manifest_entry, sha256_of_disk, tmp_path):
    # No public way yet to create a disk with a chosen DataWriteGuid, so the header is patched.
    entry = manifest_entry(ORPHAN)
    parent = _empty_parent(tmp_path, manifest_entry)
    _patch_data_write_guid(parent, ORPHAN_PARENT_LINKAGE)
    with vhdx.open(specimen(ORPHAN), parents=[parent]) as disk:
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]
