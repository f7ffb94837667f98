"""The package's base: errors and exit codes, atomic writes, shared types and names.

Imports only the standard library and numpy (tests/test_layers.py holds it to that), so every
other layer, the run side's included, can use it without pulling torch or the exporter in.
"""
