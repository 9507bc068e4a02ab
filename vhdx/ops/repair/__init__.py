"""Repair and salvage: a damaged VHDX brought back, to a copy by default, with a report of
what was lost (``vhdx repair``); a dirty log replayed (``vhdx replay``); the safe fixes of
``vhdx check --repair``.

``salvage`` reads the damaged file without trusting it (``scan``: headers, log, region
tables; ``meta``: metadata items; ``batfix``: BAT entries, as the list of the non-zero ones);
``rebuild`` writes the copy; ``inplace`` writes the fixes into the file itself through the log
(``batpages``: the BAT pages that change, found chunk by chunk); ``run`` is the API.
"""

from .report import SalvageReport, Structure
from .run import ReplayResult, fix_in_place, repair, repair_in_place, replay, replay_on

__all__ = ["repair", "repair_in_place", "replay", "replay_on", "fix_in_place", "ReplayResult", "SalvageReport",
           "Structure"]
