"""The one test kit: what every test folder shares, so that no folder grows its own copy.

``support.disk`` reads and writes whole virtual disks and compares them with an in-memory model;
``support.chain`` builds chains layer by layer with that model; ``support.cli`` runs the command
line in this process or in a fresh one; ``support.faults`` is the one fault-injecting Storage; ``support.needs`` skips a test whose
tool, peer or device is missing (and fails it under ``CI=true``). Kits of one domain build on
those: ``support.merging`` (chains with a byte model, judges of a merge), ``support.maintenance``
(random disks for compact / resize / convert), ``support.forensic_chain`` (chains with a model
of every layer's map), ``support.filesystems`` (real file systems inside chains),
``support.mounting`` (FUSE mounts that are always unmounted), ``support.repair`` (damaged
disks and the structures a repair test destroys).
Nothing here imports a test folder: the folders import the kit (tests/conftest.py puts tests/ on
``sys.path``).
"""
