"""Pure format layer: bytes in, values out. No files, no os, no clock, no randomness."""
