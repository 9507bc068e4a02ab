"""Every format/ declaration against hex fixtures taken from real files (fixtures/format/).

Each fixture holds the bytes of one structure from a specimen and the field values an independent
reading gave (fixtures/extract.py decodes them with ``struct`` and checks them against the
specimens' manifest: qemu-img info, vhdiinfo). For each construct declaration in
``vhdx.format.structs`` and each record-level function in ``records`` and ``locator``, the tests
check both directions: parse(bytes) == the recorded fields, and build(the recorded fields) == bytes.
fixtures/README.md explains the file format.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import construct as cs
import numpy as np
import pytest

from vhdx.format import bat as batmod
from vhdx.format import structs
from vhdx.format.checksum import crc32c_zeroed, stored_checksum
from vhdx.format.locator import KEY_ORDER, build_parent_locator, parse_parent_locator
from vhdx.format.records import (Header, MetadataEntry, RegionEntry, build_file_identifier, build_header,
                                 build_metadata_region, build_region_table, metadata_items, parse_creator,
                                 parse_header, parse_metadata_region, parse_region_table, system_items)

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "format"
LINE = 32
RECORD_KINDS = {"file_identifier", "header", "region_table", "metadata_region", "parent_locator", "log_entry"}
DECLARATIONS = {name: obj for name, obj in vars(structs).items()
                if isinstance(obj, (cs.Construct, structs.Flat)) and not name.startswith("_")}


# ------------------------------------------------------------------------------ loading

def fixture_bytes(fixture: dict[str, Any]) -> bytes:
    """The structure's bytes: zeros of ``length``, with every stored chunk laid over them."""
    raw = bytearray(fixture["length"])
    for chunk in fixture["chunks"]:
        data = bytes.fromhex("".join(chunk["hex"]))
        assert all(len(line) == 2 * LINE for line in chunk["hex"][:-1]), "hex lines are 32 bytes"
        assert chunk["at"] + len(data) <= len(raw), f"chunk at {chunk['at']} runs past the length"
        raw[chunk["at"]:chunk["at"] + len(data)] = data
    return bytes(raw)


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[dict[str, Any], bytes]:
    """One fixture file and its bytes."""
    with open(FIXTURE_DIR / f"{name}.json", encoding="utf-8") as handle:
        fixture = json.load(handle)
    return fixture, fixture_bytes(fixture)


NAMES = sorted(path.stem for path in FIXTURE_DIR.glob("*.json"))
PARTS = [(name, i) for name in NAMES for i in range(len(load(name)[0]["structs"]))]
RECORDS = [name for name in NAMES if "record" in load(name)[0]]


def part_id(value: tuple[str, int]) -> str:
    """Test id of one construct part: fixture:Construct@offset."""
    part = load(value[0])[0]["structs"][value[1]]
    return f"{value[0]}:{part['construct']}@{part['at']}"


def utf16_padded(value: dict[str, Any]) -> bytes:
    """UTF-16LE text padded with zeros to ``pad_to`` bytes."""
    text = value["utf16le"].encode("utf-16-le")
    return text + bytes(value["pad_to"] - len(text))


TYPED_FORMS = {
    frozenset({"guid"}): lambda value, raw: uuid.UUID(value["guid"]),
    frozenset({"hex"}): lambda value, raw: bytes.fromhex(value["hex"]),
    frozenset({"ascii"}): lambda value, raw: value["ascii"].encode("ascii"),
    frozenset({"zeros"}): lambda value, raw: bytes(value["zeros"]),
    frozenset({"utf16le", "pad_to"}): lambda value, raw: utf16_padded(value),
    frozenset({"fixture_bytes"}): lambda value, raw: raw[value["fixture_bytes"][0]:value["fixture_bytes"][1]],
}


def decode(value: Any, raw: bytes) -> Any:
    """A fixture value as Python: plain JSON, or one of the typed forms of fixtures/README.md.

    A typed form is an object with exactly the keys of one form; any other object is a mapping
    of field names whose values are decoded in turn.
    """
    if isinstance(value, list):
        return [decode(v, raw) for v in value]
    if not isinstance(value, dict):
        return value
    form = TYPED_FORMS.get(frozenset(value))
    if form is not None:
        return form(value, raw)
    return {key: decode(v, raw) for key, v in value.items()}


def record(name: str) -> tuple[dict[str, Any], bytes]:
    """The decoded record expectations of a fixture, and the fixture's bytes."""
    fixture, raw = load(name)
    return {k: decode(v, raw) for k, v in fixture["record"].items() if k != "kind"}, raw


# ------------------------------------------------------------------------------ construct declarations

def part_slice(name: str, index: int) -> tuple[cs.Construct, dict[str, Any], bytes]:
    """The declaration, the part description and the bytes it covers."""
    fixture, raw = load(name)
    part = fixture["structs"][index]
    assert part["construct"] in DECLARATIONS, f"{part['construct']} is not declared in vhdx.format.structs"
    declaration = DECLARATIONS[part["construct"]]
    return declaration, part, raw[part["at"]:part["at"] + declaration.sizeof()]


@pytest.mark.parametrize("name,index", PARTS, ids=[part_id(p) for p in PARTS])
def test_declaration_parses_to_the_recorded_fields(name: str, index: int) -> None:
    declaration, part, chunk = part_slice(name, index)
    _, raw = load(name)
    parsers = [declaration.parse]
    if isinstance(declaration, structs.Flat):  # the fast parser and construct's, alike
        parsers.append(declaration.declared.parse)
    for parse in parsers:
        parsed = parse(chunk)
        if "value" in part:
            assert parsed == decode(part["value"], raw)
            continue
        got = {key: value for key, value in parsed.items() if not key.startswith("_")}
        assert got == decode(part["fields"], raw)


@pytest.mark.parametrize("name,index", PARTS, ids=[part_id(p) for p in PARTS])
def test_declaration_builds_the_recorded_bytes(name: str, index: int) -> None:
    declaration, part, chunk = part_slice(name, index)
    _, raw = load(name)
    value = decode(part["value"] if "value" in part else part["fields"], raw)
    assert declaration.build(value) == chunk


def test_every_declaration_has_a_fixture() -> None:
    covered = {load(name)[0]["structs"][i]["construct"] for name, i in PARTS}
    print(f"fixtures: {len(NAMES)}, construct parts: {len(PARTS)}, declarations covered: "
          f"{len(covered & set(DECLARATIONS))} of {len(DECLARATIONS)}")
    assert set(DECLARATIONS) - covered == set()


def test_every_record_kind_has_a_fixture() -> None:
    kinds = {load(name)[0]["record"]["kind"] for name in RECORDS}
    print(f"record fixtures: {len(RECORDS)}, kinds: {sorted(kinds)}")
    assert kinds == RECORD_KINDS


# ------------------------------------------------------------------------------ records: parse

def names_of(kind: str) -> list[str]:
    """The fixtures whose record is of ``kind``."""
    return [name for name in RECORDS if load(name)[0]["record"]["kind"] == kind]


@pytest.mark.parametrize("name", names_of("file_identifier"))
def test_file_identifier_round_trip(name: str) -> None:
    expected, raw = record(name)
    assert parse_creator(raw) == expected["creator"]
    assert build_file_identifier(expected["creator"]) == raw


@pytest.mark.parametrize("name", names_of("header"))
def test_header_round_trip(name: str) -> None:
    expected, raw = record(name)
    header = Header(**expected)
    assert parse_header(raw) == header
    assert build_header(header) == raw
    assert build_header(parse_header(raw)) == raw


@pytest.mark.parametrize("name", names_of("region_table"))
def test_region_table_round_trip(name: str) -> None:
    expected, raw = record(name)
    entries = [RegionEntry(**entry) for entry in expected["entries"]]
    assert parse_region_table(raw) == entries
    assert build_region_table(entries) == raw
    assert build_region_table(parse_region_table(raw)) == raw


@pytest.mark.parametrize("name", names_of("parent_locator"))
def test_parent_locator_round_trip(name: str) -> None:
    expected, raw = record(name)
    pairs = parse_parent_locator(raw)
    assert list(pairs.items()) == list(expected["pairs"].items())
    assert tuple(pairs) == KEY_ORDER, "Hyper-V's key order"
    assert build_parent_locator(expected["pairs"]) == raw


# ------------------------------------------------------------------------------ records: metadata region

METADATA_SCALARS = ("block_size", "leave_block_allocated", "has_parent", "virtual_disk_size",
                    "logical_sector_size", "physical_sector_size", "page83_data", "parent_locator")


def metadata_values(md: Any) -> dict[str, Any]:
    """What a parsed metadata region says, as comparable values (locator in file order)."""
    values = {key: getattr(md, key) for key in METADATA_SCALARS}
    if values["parent_locator"] is not None:
        values["parent_locator"] = list(values["parent_locator"].items())
    values["entries"] = list(md.entries)
    return values


def expected_metadata(expected: dict[str, Any]) -> dict[str, Any]:
    """The fixture's metadata expectations in the form of :func:`metadata_values`."""
    values = {key: expected[key] for key in METADATA_SCALARS}
    if values["parent_locator"] is not None:
        values["parent_locator"] = list(values["parent_locator"].items())
    values["entries"] = [MetadataEntry(**entry) for entry in expected["entries"]]
    return values


def without_offsets(values: dict[str, Any]) -> dict[str, Any]:
    """Metadata values with each entry reduced to (item, length, flags): what survives a relayout."""
    return dict(values, entries=[(e.item_id, e.length, e.flags) for e in values["entries"]])


def items_from(expected: dict[str, Any]) -> list[Any]:
    """The system items rebuilt from the recorded values alone (Windows' order and flags)."""
    locator = expected["parent_locator"]
    return system_items(
        block_size=expected["block_size"], leave_block_allocated=expected["leave_block_allocated"],
        has_parent=expected["has_parent"], virtual_disk_size=expected["virtual_disk_size"],
        logical_sector_size=expected["logical_sector_size"],
        physical_sector_size=expected["physical_sector_size"], page83_data=expected["page83_data"],
        parent_locator=None if locator is None else build_parent_locator(locator))


def rebuilt_form(name: str) -> bytes:
    """The fixture's bytes with the ranges a rebuild writes as zeros cleared (fixtures/README.md)."""
    fixture, raw = load(name)
    out = bytearray(raw)
    for span in fixture["rebuilt_zeroes"]:
        out[span["at"]:span["at"] + span["length"]] = bytes(span["length"])
    return bytes(out)


@pytest.mark.parametrize("name", names_of("metadata_region"))
def test_metadata_region_parses_to_the_recorded_values(name: str) -> None:
    expected, raw = record(name)
    assert metadata_values(parse_metadata_region(raw)) == expected_metadata(expected)


@pytest.mark.parametrize("name", names_of("metadata_region"))
def test_metadata_region_builds_the_recorded_bytes(name: str) -> None:
    fixture, raw = load(name)
    expected, _ = record(name)
    parsed = parse_metadata_region(raw)
    from_values = build_metadata_region(items_from(expected), len(raw))
    from_parse = build_metadata_region(metadata_items(parsed), len(raw))
    want = without_offsets(expected_metadata(expected))
    assert without_offsets(metadata_values(parse_metadata_region(from_values))) == want
    assert without_offsets(metadata_values(parse_metadata_region(from_parse))) == want
    if fixture["rebuild_exact"]:
        assert from_values == rebuilt_form(name)
        assert from_parse == rebuilt_form(name)
    else:
        # The writer laid its items out in another order than ours: only the values survive.
        assert from_values != raw and from_parse != raw


# ------------------------------------------------------------------------------ records: log entries

def rebuilt_pages(raw: bytes, count: int) -> list[tuple[int, bytes]]:
    """(file offset, 4 KiB page) of each data descriptor, rebuilt from its data sector (§8.4)."""
    first_data = 4096 * -(-(64 + 32 * count) // 4096)
    pages = []
    for i in range(count):
        desc = structs.DataDescriptor.parse(raw[64 + 32 * i:96 + 32 * i])
        sector = structs.DataSector.parse(raw[first_data + 4096 * i:first_data + 4096 * (i + 1)])
        pages.append((desc.file_offset, desc.leading_bytes + sector.data + desc.trailing_bytes))
    return pages


def nonzero_bat_entries(page: bytes) -> list[list[int]]:
    """[index, state, file offset] of the non-zero BAT entries in a page."""
    entries = batmod.decode_bat(page)
    index = np.flatnonzero(entries)
    return [[int(i), int(s), int(o)] for i, s, o in
            zip(index, batmod.states(entries)[index], batmod.file_offsets(entries)[index])]


@pytest.mark.parametrize("name", names_of("log_entry"))
def test_log_entry_checksum_and_pages(name: str) -> None:
    expected, raw = record(name)
    header = structs.LogEntryHeader.parse(raw[:64])
    assert len(raw) == header.entry_length == expected["entry_length"]
    assert stored_checksum(raw) == crc32c_zeroed(raw) == expected["checksum"]
    pages = rebuilt_pages(raw, header.descriptor_count)
    got = [{"file_offset": offset, "bat_entries": nonzero_bat_entries(page)} for offset, page in pages]
    assert got == expected["pages"]


# ------------------------------------------------------------------------------ provenance

SPECIMEN_PREFIX = 4 << 20  # every fixture lies in the first 4 MiB of its specimen


@functools.lru_cache(maxsize=None)
def specimen_prefix(archive: Path, compression: str, member: str | None) -> bytes:
    """The first 4 MiB of a compressed specimen, decompressed in memory."""
    if compression == "gzip":
        with gzip.open(archive, "rb") as stream:
            return stream.read(SPECIMEN_PREFIX)
    if compression == "bzip2":
        with bz2.open(archive, "rb") as stream:
            return stream.read(SPECIMEN_PREFIX)
    with zipfile.ZipFile(archive) as zipped, zipped.open(member or zipped.namelist()[0]) as stream:
        return stream.read(SPECIMEN_PREFIX)


SPECIMEN_FIXTURES = [name for name in NAMES if "specimen" in load(name)[0]["source"]]


@pytest.mark.parametrize("name", SPECIMEN_FIXTURES)
def test_fixture_bytes_are_the_specimen_bytes(name: str, shared_dir: Path,
                                              manifest_entry: Any) -> None:
    """The stored chunks, zeros elsewhere, are exactly the bytes at the recorded file offset."""
    fixture, raw = load(name)
    source = fixture["source"]
    entry = manifest_entry(source["specimen"])
    assert source["sha256_of_decompressed_vhdx"] == entry["sha256_of_decompressed_vhdx"]
    prefix = specimen_prefix(shared_dir / "specimens" / entry["file"], entry["compression"],
                             entry.get("zip_member"))
    at = source["file_offset"]
    assert at + len(raw) <= len(prefix)
    assert prefix[at:at + len(raw)] == raw
