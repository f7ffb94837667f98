"""torch -> ONNX, one graph per pipeline component, written atomically, plus `manifest.json`.

Build side. Reads the component descriptors of `models/`, writes the artifacts of `artifacts/`;
never imports the engine builder, the runtime or the CLI. Modules: `config` (ExportConfig,
events), `convert` (export_model), `pipeline` (the torch side: GAG, reduced copies, releasing
weights, sample feeds), `graphs` (reading graphs back, repairs, slimming), `incremental`
(partial exports that add to an existing one).

    config = ExportConfig("tiny-sdxl", Path("graphs"), ImageShape(64, 64), gag=GAGConfig(method="bisect"))
    manifest = export_model(pipe, entry, config)            # graphs/tiny-sdxl/{<component>/model.onnx, manifest.json}

What is written (DESIGN.md "Manifest"):

- `graphs/<model>/<component>/model.onnx`; when the weights exceed the 2 GB protobuf limit
  (a full-size SDXL UNet) they go to one external data file beside it, `model.onnx.data`.
- `graphs/<model>/manifest.json`. A component's `sha256` is the SHA-256 of the bytes of
  `model.onnx` followed by the bytes of its external data file, if it has one (so for a graph
  without external data it is the plain file digest); `size_bytes` is the sum of both files;
  `external_data` is null or `{"path", "sha256", "size_bytes"}` of the data file alone. Use
  `graph_sha256(path)` to recompute it. `inputs`/`outputs` are read back from the saved graph.
- `graphs/<model>/<component>/parity.npz` (fp32/fp16 components): the sample feed and torch's
  fp32 eager outputs for it, named in the manifest (`parity_reference`: path, sha256, seed), so
  that `check` compares ONNX Runtime with torch without loading the model (`parity.py`).

Atomicity: everything is written into a temp folder in the same parent (`graphs/.<model>.*.tmp`)
and moved into place with `os.replace` at the end; a failed or interrupted export (including
out-of-disk and out-of-memory, raised as `ResourceExhaustedError`) removes the temp folder and
leaves the previous export, if any, untouched. An export of some components (`components=`)
into a folder holding an export made with the same settings carries the others over into the
temp folder (hard links) and lists them in the new manifest; over an export made with other
settings it is refused (InvalidInputError) rather than deleting them.

Reduced precision (`fp16`/`bf16`): each component is copied and cast (weights cast while
copying, one component at a time: an fp16 SDXL export holds the fp32 pipeline plus one fp16
component, not a second pipeline), then exported as typed, so
the graph's types are exactly torch's: the GAG arithmetic (which `gag/math.py` does in fp32 and
casts back) and diffusers' own upcasts stay fp32 inside an fp16 graph. One exporter defect is
repaired after export: `aten.cat` over mixed float types is emitted as a `Concat` without the
type promotion torch applies (SDXL's `text_embeds` fp16 + fp32 time-id embedding); we insert the
`Cast` torch's promotion implies (`promote_concat_inputs`).

Parity (ONNX Runtime vs torch eager on the descriptor's sample inputs) lives in `parity.py`;
the `--slim` gate compares with the module in memory, `check/parity.py` with the recorded reference.
"""

from .config import (
    DEFAULT_EXPORT_GAG,
    DEFAULT_OPSET,
    EXPORTERS,
    OPSET_RANGE,
    ComponentStats,
    ExportConfig,
    ExportEvent,
)
from .convert import export_model, versions
from .graphs import (
    LARGE_WEIGHTS_BYTES,
    graph_io,
    load_graph_structure,
    save_graph,
    slim_graph,
)
from .pipeline import denoiser_module, sample_feed

__all__ = [
    "DEFAULT_EXPORT_GAG", "DEFAULT_OPSET", "EXPORTERS", "LARGE_WEIGHTS_BYTES", "OPSET_RANGE", "ComponentStats", "ExportConfig",
    "ExportEvent", "denoiser_module", "export_model", "graph_io", "load_graph_structure", "sample_feed", "save_graph",
    "slim_graph", "versions",
]
