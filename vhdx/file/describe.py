"""``vhdx info`` of one file: everything about it as JSON-ready values.

The BAT's state counts come from its non-zero entries (:meth:`Image.count_states`), read in
bounded chunks, so describing a 64 TiB disk costs what its data costs.
"""

from __future__ import annotations

from typing import Any

from ..format import constants as C


def describe(image: Any) -> dict[str, Any]:
    """Everything about ``image`` (an open :class:`~vhdx.file.image.Image`) as JSON-ready values."""
    g = image.geometry
    payload_states, sbm_states = image.count_states()
    return {
        "path": image.path,
        "creator": image.creator,
        "disk_type": image.disk_type,
        "virtual_size": image.size,
        "block_size": image.block_size,
        "logical_sector_size": image.logical_sector_size,
        "physical_sector_size": image.physical_sector_size,
        "disk_id": str(image.metadata.page83_data),
        "data_write_guid": str(image.header.data_write_guid),
        "file_write_guid": str(image.header.file_write_guid),
        "file_size": image.storage.size(),
        "headers": headers_info(image),
        "headers_identical": image.headers_identical,
        "region_table": [e.to_dict() for e in image.region_table],
        "region_table_errors": image.region_table_errors,
        "metadata": image.metadata.to_dict(),
        "bat": {
            "file_offset": image.bat_region.file_offset, "length": image.bat_region.length,
            "chunk_ratio": g.chunk_ratio, "payload_blocks": g.payload_blocks,
            "sector_bitmap_blocks": g.sector_bitmap_blocks, "entries": g.bat_entries,
            "payload_states": payload_states,
            "sector_bitmap_states": sbm_states,
        },
        "log": {
            "offset": image.header.log_offset, "length": image.header.log_length,
            "log_guid": str(image.header.log_guid),
            "dirty": image.log_was_dirty,
            "replayed_in_memory": image.log_replayed_in_memory,
            "replayed_entries": [e.to_dict() for e in image.log_replayed],
        },
    }


def headers_info(image: Any) -> list[dict[str, Any]]:
    """Both headers: offset, validity, which is current, their fields or the error."""
    headers = []
    for i, offset in enumerate(C.HEADER_OFFSETS):
        h = image.headers[i]
        d: dict[str, Any] = {"offset": offset, "valid": h is not None, "current": i == image.current_header_index}
        if h is not None:
            d.update(h.to_dict())
        else:
            d["error"] = image.header_errors[i]
        headers.append(d)
    return headers
