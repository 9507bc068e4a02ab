"""chains/ is a disk and its parents: it finds and opens parents, read-only, and never writes a parent.

Rule: this floor imports only ``file/``, ``format/`` and ``errors`` (never ``ops/`` or ``cli/``).
"""
