"""Merge: fold differencing layers into an ancestor, like Hyper-V's Merge-VHD.

A merge copies every sector that the child and the layers between it and the destination
define into the destination (an ancestor: the parent, or one further down), so that the
destination then reads exactly as the child did and carries a new DataWriteGuid; the merged
files are deleted (or, kept, let go of it). :mod:`.plan` works out what to copy from the BATs
and bitmaps, :mod:`.journal` is the record in the destination that makes the merge safe to
interrupt and to run again, :mod:`.run` is the protocol and :mod:`.cleanup` its last steps.
This package is on the ops floor: it imports only from chains, file, format and errors.
"""
