"""Tests of the ops floor (vhdx/ops): what you do, as library calls."""
