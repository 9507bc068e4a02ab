"""Floor 0, bytes: format/ is bytes in, values out: no files, no os, no clock (and no randomness).

Every structure of a VHDX file is parsed and built here as pure functions (construct
declarations in :mod:`.structs`, values in :mod:`.records`, the BAT as numpy arrays in
:mod:`.bat`, the file's span map in :mod:`.layout`); nothing here imports from another floor.
"""
