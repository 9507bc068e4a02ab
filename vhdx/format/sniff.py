"""Which other format a file is, when it is not a VHDX: bytes of its head and tail in, a name out.

Only for the error message of a file without the VHDX signature ("this is a VHD (v1) file;
vhdx reads VHDX only"), so the signatures are the plain ones each format starts (or ends) with:
VHD v1 (the ``conectix`` footer, copied at offset 0 in dynamic and differencing disks, the last
512 bytes of every VHD), qcow and qcow2 (``QFI\\xfb``), VMDK (a ``KDMV`` sparse extent, a ``COWD``
ESX extent, or a text descriptor), VDI (its signature at 0x40) and ISO 9660 (``CD001`` at 0x8001).
"""

from __future__ import annotations

import struct

HEAD_SIZE = 0x8006  # up to the end of the ISO 9660 volume descriptor's identifier
TAIL_SIZE = 512     # a VHD footer

_VHD_COOKIE = b"conectix"
_VHD_TYPES = {2: "fixed ", 3: "dynamic ", 4: "differencing "}
_VDI_SIGNATURE = 0xBEDA107F
_VMDK_DESCRIPTOR = b"# Disk DescriptorFile"


def _vhd(head: bytes, tail: bytes) -> str | None:
    """A VHD (v1) footer at the start (dynamic, differencing) or in the last 512 (or 511) bytes."""
    for footer in (head[:TAIL_SIZE], tail[-TAIL_SIZE:], tail[-TAIL_SIZE + 1:]):
        if footer.startswith(_VHD_COOKIE):
            kind = _VHD_TYPES.get(struct.unpack(">I", footer[60:64])[0], "") if len(footer) >= 64 else ""
            return f"a {kind}VHD (v1) file"
    return None


def _by_magic(head: bytes) -> str | None:
    """qcow, qcow2, VMDK, VDI and ISO 9660 by the bytes of their first sectors."""
    if head.startswith(b"QFI\xfb"):
        version = struct.unpack(">I", head[4:8])[0] if len(head) >= 8 else 0
        return "a qcow (v1) image" if version == 1 else "a qcow2 image"
    if head.startswith(b"KDMV") or head.startswith(b"COWD"):
        return "a VMDK sparse extent"
    if head.lstrip(b"\xef\xbb\xbf").startswith(_VMDK_DESCRIPTOR):
        return "a VMDK descriptor (a text file naming the VMDK's extents)"
    if len(head) >= 0x44 and struct.unpack("<I", head[0x40:0x44])[0] == _VDI_SIGNATURE:
        return "a VirtualBox VDI image"
    if head[0x8001:0x8006] == b"CD001":
        return "an ISO 9660 image (a CD or DVD, not a disk)"
    return None


def sniff(head: bytes, tail: bytes) -> str | None:
    """The format of a file that starts with ``head`` (its first :data:`HEAD_SIZE` bytes, or all of
    a shorter file) and ends with ``tail`` (its last :data:`TAIL_SIZE` bytes), as "a qcow2 image",
    "a dynamic VHD (v1) file", "an empty file"; None when it is none of the formats known here
    (a VHDX among them)."""
    if not head:
        return "an empty file"
    return _by_magic(head) or _vhd(head, tail)


def not_vhdx_message(head: bytes, tail: bytes, size: int) -> str:
    """What to say about a file of ``size`` bytes without the VHDX signature: the format found, or
    that it is not a VHDX."""
    name = sniff(head, tail)
    if name == "an empty file":
        return "the file is empty (0 bytes): not a VHDX file"
    if name is not None:
        return f"this is {name}; vhdx reads VHDX only"
    return f"not a VHDX file (no 'vhdxfile' signature{'' if size >= 8 else f'; {size} bytes'})"
