"""The on-disk contract between the build side and the run side: the export's manifest and graph
digests (`manifest.py`), and the engine cache (`engines.py`).

Imports only the standard library, numpy and `core` (tests/test_layers.py holds it to that): the
runtime and the server read artifacts through it without loading torch, ONNX or the exporter.
"""
