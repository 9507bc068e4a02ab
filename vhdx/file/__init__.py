"""Floor 1, one file: file/ is one .vhdx file: nothing here knows about parents or chains.

:mod:`.storage` (positional I/O) and :mod:`.locks` (QEMU-compatible locks) are the host file;
:mod:`.log` the VHDX log; :mod:`.image` opens, validates and reads; :mod:`.writer` (with
:mod:`.extents` and :mod:`.copy`) is the one writer of metadata; :mod:`.create` makes a new
file; :mod:`.outputs` publishes output files atomically. Imports go only down, to format/.
"""
