"""The one test kit: what every test folder shares, so that no folder grows its own copy.

``support.disk`` reads and writes whole virtual disks and compares them with an in-memory model;
``support.chain`` builds chains layer by layer with that model; ``support.cli`` runs the command
line in this process or in a fresh one; ``support.faults`` is the one fault-injecting Storage.
Nothing here imports a test folder: the folders import the kit (tests/conftest.py puts tests/ on
``sys.path``).
"""
