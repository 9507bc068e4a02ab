"""The salvage report: each structure found, repaired or lost, and the virtual byte ranges
whose content could not be recovered (what the repaired copy does not hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FOUND = "found"          # intact, used as it is
REPAIRED = "repaired"    # damaged or missing, rebuilt (from its copy, a scan, inference or the user)
LOST = "lost"            # damaged beyond repair; what depended on it is listed as lost
ABSENT = "absent"        # not part of this file (a log that was clean, a locator of a disk without parent)


@dataclass(frozen=True)
class Structure:
    """One structure of the file and what repair did with it."""

    name: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return dict(name=self.name, status=self.status, detail=self.detail)


@dataclass
class SalvageReport:
    """What ``vhdx repair`` found and did. ``unrecoverable`` holds the reason when no output
    could be made (and nothing was written); ``lost`` lists virtual byte ranges [start, end)
    whose content is not in the output (it reads as the parent's, or zeros)."""

    path: str
    output: str | None = None
    in_place: bool = False
    structures: list[Structure] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unrecoverable: str | None = None
    virtual_size: int | None = None

    def add(self, name: str, status: str, detail: str = "") -> None:
        """Record what happened to structure ``name``."""
        self.structures.append(Structure(name, status, detail))

    def lose(self, start: int, end: int) -> None:
        """Record the virtual range [start, end) as not recovered (merged with its neighbours later)."""
        if end > start:
            self.lost.append((start, end))

    def fail(self, reason: str) -> None:
        """Mark the file unrecoverable (the first reason wins)."""
        if self.unrecoverable is None:
            self.unrecoverable = reason

    @property
    def ok(self) -> bool:
        """True when an output was (or can be) made."""
        return self.unrecoverable is None

    @property
    def changed(self) -> bool:
        """True when anything was repaired or lost."""
        return any(s.status in (REPAIRED, LOST) for s in self.structures) or bool(self.lost)

    def lost_ranges(self) -> list[tuple[int, int]]:
        """The lost ranges, sorted and merged, clipped at the virtual size."""
        out: list[tuple[int, int]] = []
        limit = self.virtual_size
        for start, end in sorted(self.lost):
            if limit is not None:
                end = min(end, limit)
            if end <= start:
                continue
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        return out

    def lost_bytes(self) -> int:
        """How many virtual bytes were not recovered."""
        return sum(e - s for s, e in self.lost_ranges())

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return dict(path=self.path, output=self.output, in_place=self.in_place, recoverable=self.ok,
                    unrecoverable=self.unrecoverable, virtual_size=self.virtual_size,
                    structures=[s.to_dict() for s in self.structures],
                    lost=[dict(start=s, end=e, length=e - s) for s, e in self.lost_ranges()],
                    lost_bytes=self.lost_bytes(), notes=list(self.notes))

    def lines(self) -> list[str]:
        """The report as lines of text, for people."""
        out = [f"{s.name:18} {s.status:9} {s.detail}".rstrip() for s in self.structures]
        out += [f"note: {n}" for n in self.notes]
        ranges = self.lost_ranges()
        if ranges:
            out.append(f"lost: {len(ranges)} virtual range(s), {self.lost_bytes()} bytes not recovered "
                       "(they read as the parent's, or zeros):")
            out += [f"  0x{s:x}-0x{e:x} ({e - s} bytes)" for s, e in ranges[:50]]
            if len(ranges) > 50:
                out.append(f"  ... and {len(ranges) - 50} more (see --json)")
        elif self.ok:
            out.append("lost: nothing; every virtual byte was recovered")
        if self.unrecoverable:
            out.append(f"unrecoverable: {self.unrecoverable}")
        return out
