"""What every exported component answers: names, shapes, profiles, sample inputs, tolerances.

One `ComponentDescriptor` subclass per component per family (SDXL: `text_encoder`,
`text_encoder_2`, `unet`, `vae_decoder`; FLUX: `text_encoder`, `text_encoder_2`, `transformer`,
`vae_decoder`). Export, engine building and buffer allocation all read from it, so a shape or
name lives in exactly one place.

Shapes use ints for static dims and strings for symbolic ones; `dim_values(ImageShape)` gives
the ints behind the symbols, from which `profile`, `shapes` and `sample_inputs` are derived
once, here, for every descriptor.

    desc = SDXLUNet()                                   # full-size SDXL dims
    desc.inputs("fp16")                                 # [TensorSpec("sample", "float16", ("batch", 4, ...)), ...]
    desc.profile(ImageShape(768, 768), ImageShape(1024, 1024), ImageShape(1024, 1536, batch=2))
    module = desc.export_module(pipe)                   # forward(*inputs in order) -> tuple(outputs)
"""

from __future__ import annotations

import abc
import keyword
import logging
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Mapping

import torch

from ..core.errors import InvalidInputError
from ..core.names import GAG_INPUTS, PER_LAYER_GAG_INPUTS
from ..core.precision import Precision
from ..core.shapes import ImageShape

log = logging.getLogger(__name__)

Dim = int | str
# Values of the 0-d guidance inputs in `sample_inputs`: all three GAG terms active (zeta > 0
# exercises the orthogonal part), so traces and parity checks cover the whole graph.
SAMPLE_GAG_VALUES = {"gag_scale": 10.0, "gag_eta": 15.0, "gag_zeta": 0.5}


# --------------------------------------------------------------------------- precision


TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, and shape (int static, str symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"TensorSpec {self.name}: unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def symbols(self) -> dict[int, str]:
        """{axis: symbol} for the symbolic dims."""
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for these symbol values."""
        try:
            return tuple(dim if isinstance(dim, int) else int(dims[dim]) for dim in self.shape)
        except KeyError as exc:
            raise InvalidInputError(f"{self.name}: no value for symbolic dim {exc.args[0]!r}") from None

    def to_dict(self) -> dict:
        """The manifest form: {"name", "dtype", "shape": [...]} (0-d: shape [])."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def gag_specs(layers: int = 0) -> list[TensorSpec]:
    """The three float32 guidance inputs of a GAG denoiser (always float32, any precision).

    `layers`: the number of rewritten layers; gag_scale and gag_eta are then [layers] vectors in
    the order `apply_gag` returns the names. 0: all three 0-d (exports made before per-layer values).
    """
    return [TensorSpec(name, "float32", (layers,) if layers and name in PER_LAYER_GAG_INPUTS else ())
            for name in GAG_INPUTS]


# --------------------------------------------------------------------------- export wrappers


def _forward_with_signature(names: tuple[str, ...]):
    """`def forward(self, a, b, ...): return self.run(a=a, b=b, ...)` with these parameter names.

    torch.export binds `dynamic_shapes` and names ONNX graph inputs from the forward signature,
    and it cannot bind a `*args` forward, so each wrapper gets an explicit one (built the way
    dataclasses builds `__init__`).
    """
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name == "self":
            raise ValueError(f"not a valid input name: {name!r}")
    params = ", ".join(names)
    call = ", ".join(f"{name}={name}" for name in names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.run({call})\n", namespace)  # noqa: S102
    return namespace["forward"]


class ExportWrapper(torch.nn.Module):
    """A component as a graph: `forward(*inputs in order) -> tuple(outputs in order)`.

    Subclasses implement `run(**inputs) -> tuple`. `wrap(...)` returns an instance of a subclass
    whose forward has exactly the descriptor's input names as parameters.
    """

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def run(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def wrap(cls, input_names, output_names, *args, **kwargs) -> "ExportWrapper":
        names = tuple(input_names)
        bound = type(
            cls.__name__,
            (cls,),
            {
                "forward": _forward_with_signature(names),
                "input_names": names,
                "output_names": tuple(output_names),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )
        return bound(*args, **kwargs)


class DenoiserWrapper(ExportWrapper):
    """Adds the GAG binding: with GAG applied, `gag_*` inputs are bound around the model call."""

    def __init__(self, model: torch.nn.Module, gag: bool):
        super().__init__()
        self.model = model
        self.gag = gag

    def run(self, gag_scale=None, gag_eta=None, gag_zeta=None, **inputs):
        if not self.gag:
            return self.call_model(**inputs)
        from ..gag.attention import guidance_params

        with guidance_params(self.model).bind(gag_scale, gag_eta, gag_zeta):
            return self.call_model(**inputs)

    def call_model(self, **inputs) -> tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError


def model_has_gag(model: torch.nn.Module) -> bool:
    from ..gag.attention import is_gag_applied

    return is_gag_applied(model)


# --------------------------------------------------------------------------- descriptors

# Parity tolerances of an exported graph against eager torch, per precision. Measured on tiny
# models, ORT vs torch fp32 differ by <= 5e-6 (shared/EXPORT-NOTES.md); 1e-4 leaves room for
# the accumulation-order noise of full-size models. fp16 keeps ~3 significant digits
# (eps 9.8e-4) and bf16 ~2 (eps 7.8e-3), compounded over dozens of layers: the looser values
# below are deliberate. They apply elementwise as Polygraphy's SimpleCompareFunc does: an element
# passes when |a - b| <= atol or |a - b| / |b| <= rtol.
TOLERANCES = {
    Precision.FP32: {"atol": 1e-4, "rtol": 1e-4},
    Precision.FP16: {"atol": 2e-2, "rtol": 1e-2},
    Precision.BF16: {"atol": 1e-1, "rtol": 5e-2},
}


@dataclass(frozen=True)
class ComponentDescriptor(abc.ABC):
    """One exported component of one family. Subclasses are frozen dataclasses of model dims.

    `name` and `role` are class attributes; everything derivable from `inputs()` and
    `dim_values()` (profile, dynamic axes, concrete shapes, sample inputs) is derived here.
    `gag` only changes the denoiser's inputs (three 0-d `gag_*` inputs); the other roles ignore it.
    """

    vae_scale_factor: int = 8
    pixel_multiple: int = 8
    # Rewritten GAG layers of the denoiser (its gag_scale/gag_eta inputs are [gag_layers]); 0: 0-d
    # inputs. Set from `apply_gag`'s names at export (`dataclasses.replace`), never from a config.
    gag_layers: int = 0

    name = ""
    role = ""  # "text_encoder" | "denoiser" | "vae_decoder"
    family = ""
    pipeline_attr = ""  # the diffusers pipeline's attribute holding the module ("" : `name`)
    # Fields that no model config determines (FLUX's text_len): kept by check_pipeline.
    CHOICE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def module_attr(self) -> str:
        """The pipeline attribute of this component's module: `unet`, `text_encoder_2`, `vae`, ..."""
        return self.pipeline_attr or self.name

    # -- to implement
    @classmethod
    @abc.abstractmethod
    def from_configs(cls, configs: Mapping[str, Mapping], **choices) -> "ComponentDescriptor":
        """Build from {component name: config dict} (diffusers/transformers config.json contents).

        A missing config leaves the full-size defaults. `choices` set the CHOICE_FIELDS.
        """

    @classmethod
    def family_dims(cls, configs: Mapping[str, Mapping]) -> dict[str, int]:
        """Dims every descriptor of a family shares: vae_scale_factor and pixel_multiple."""
        return {}

    @abc.abstractmethod
    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def export_module(self, pipe) -> ExportWrapper:
        """The pipeline's component wrapped so that `forward(*inputs()) -> tuple(outputs())`."""

    def _sample(self, spec: TensorSpec, shape: tuple[int, ...], dims: Mapping[str, int], gen: torch.Generator):
        """A realistic value for one input (default: standard normal). Subclasses override by name."""
        return torch.randn(shape, generator=gen)

    def extra_dims(self, latent_height: int, latent_width: int) -> dict[str, int]:
        """Family-specific symbols beyond batch / image / latent sizes (FLUX: image_tokens)."""
        return {}

    # -- derived
    @classmethod
    def from_pipeline(cls, pipe, **choices) -> "ComponentDescriptor":
        return cls.from_configs(pipeline_configs(pipe), **choices)

    def check_pipeline(self, pipe) -> None:
        """Raise InvalidInputError if this descriptor was built for another model than `pipe`'s."""
        expected = type(self).from_pipeline(pipe, **{name: getattr(self, name) for name in self.CHOICE_FIELDS})
        expected = replace(expected, gag_layers=self.gag_layers)
        diffs = [
            f"{f.name} {getattr(self, f.name)!r} != {getattr(expected, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(expected, f.name)
        ]
        if diffs:
            raise InvalidInputError(
                f"{self.family} {self.name} descriptor does not match the pipeline's model "
                f"({', '.join(diffs)}); build descriptors with descriptors_for(entry, pipe)"
            )

    def export_dtype(self, dtype: Precision | str) -> Precision:
        """The precision this component is exported in when `dtype` is asked for (default: the same)."""
        return Precision.parse(dtype)

    def input_names(self, gag: bool = True) -> list[str]:
        return [spec.name for spec in self.inputs("fp32", gag)]

    def output_names(self, gag: bool = True) -> list[str]:
        return [spec.name for spec in self.outputs("fp32", gag)]

    def dim_values(self, shape: ImageShape) -> dict[str, int]:
        """The value of every symbolic dim for this image shape (validates the shape)."""
        shape.require_multiple(self.pixel_multiple, self.family)
        latent_height, latent_width = shape.height // self.vae_scale_factor, shape.width // self.vae_scale_factor
        return {
            "batch": shape.batch,
            "image_height": shape.height,
            "image_width": shape.width,
            "latent_height": latent_height,
            "latent_width": latent_width,
            **self.extra_dims(latent_height, latent_width),
        }

    def shapes(self, shape: ImageShape, gag: bool = True) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output (for buffer allocation)."""
        dims = self.dim_values(shape)
        specs = self.inputs("fp32", gag) + self.outputs("fp32", gag)
        return {spec.name: spec.resolve(dims) for spec in specs}

    def profile(
        self, min_shape: ImageShape, opt_shape: ImageShape, max_shape: ImageShape, gag: bool = True
    ) -> dict[str, dict[str, list[int]]]:
        """{input: {"min": [...], "opt": [...], "max": [...]}} for an optimization profile.

        Static graphs pass the same shape three times. 0-d inputs get `[]` three times.
        """
        values = {key: self.dim_values(s) for key, s in (("min", min_shape), ("opt", opt_shape), ("max", max_shape))}
        for symbol in values["opt"]:
            lo, mid, hi = (values[key][symbol] for key in ("min", "opt", "max"))
            if not lo <= mid <= hi:
                raise InvalidInputError(
                    f"profile for {self.name}: {symbol} must satisfy min <= opt <= max, got {lo}, {mid}, {hi}"
                )
        return {
            spec.name: {key: list(spec.resolve(values[key])) for key in ("min", "opt", "max")}
            for spec in self.inputs("fp32", gag)
        }

    def dynamic_axes(self, gag: bool = True, outputs: bool = False) -> dict[str, dict[int, str]]:
        """{name: {axis: symbol}} for every input (empty for static and 0-d ones); outputs on request.

        For `torch.onnx.export(dynamo=True, dynamic_shapes=...)` pass None instead of {} for 0-d inputs.
        """
        specs = self.inputs("fp32", gag) + (self.outputs("fp32", gag) if outputs else [])
        return {spec.name: spec.symbols for spec in specs}

    def sample_inputs(
        self, shape: ImageShape, dtype: Precision | str = "fp32", seed: int = 0, gag: bool = True
    ) -> dict[str, torch.Tensor]:
        """Realistic inputs in `inputs()` order (token ids in vocab, timesteps in range, id grids)."""
        dims = self.dim_values(shape)
        gen = torch.Generator().manual_seed(seed)
        result = {}
        for spec in self.inputs(dtype, gag):
            concrete = spec.resolve(dims)
            if spec.name in SAMPLE_GAG_VALUES:
                # per-layer inputs get a spread of values (0.75x to 1.25x), so parity covers each
                # layer reading its own entry, not only the shared one
                value = torch.tensor(SAMPLE_GAG_VALUES[spec.name]) * torch.linspace(0.75, 1.25, concrete[0]) \
                    if concrete else torch.tensor(SAMPLE_GAG_VALUES[spec.name])
            else:
                value = self._sample(spec, concrete, dims, gen)
            result[spec.name] = value.to(spec.torch_dtype)
        return result

    def tolerance(self, dtype: Precision | str = "fp32") -> dict[str, float]:
        """{"atol", "rtol"} for parity of the exported graph against eager torch (see TOLERANCES)."""
        return dict(TOLERANCES[self.export_dtype(dtype)])

    def float_dtype(self, dtype: Precision | str) -> str:
        """The numpy name of floating-point tensors for this component at `dtype`."""
        return self.export_dtype(dtype).numpy_name


def token_ids(batch: int, length: int, vocab_size: int, bos: int | None, eos: int, pad: int, gen) -> torch.Tensor:
    """Padded token ids as a tokenizer makes them: [bos] words [eos] pad pad ...

    Words are drawn from [0, vocab_size) minus the special ids (so the first eos really ends the
    text, and eos stays the largest id in a row when it is the vocabulary's last id, which CLIP's
    legacy argmax pooling relies on); each row gets its own length.
    """
    specials = torch.tensor(sorted({i for i in (bos, eos, pad) if i is not None}))
    allowed = torch.arange(vocab_size)
    allowed = allowed[~torch.isin(allowed, specials)]
    start = 0 if bos is None else 1
    room = length - start - 1  # leave one slot for eos
    ids = torch.full((batch, length), pad, dtype=torch.int64)
    for row in range(batch):
        if bos is not None:
            ids[row, 0] = bos
        n_words = int(torch.randint(1, room + 1, (1,), generator=gen)) if room > 0 else 0
        ids[row, start : start + n_words] = allowed[torch.randint(0, len(allowed), (n_words,), generator=gen)]
        ids[row, start + n_words] = eos
    return ids


PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae", "scheduler")


def pipeline_configs(pipe) -> dict[str, dict]:
    """{component name: config dict} of the pipeline's loaded components."""
    configs = {}
    for name in PIPELINE_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            configs[name] = config_dict(module.config)
    return configs


def pipeline_component(pipe, name: str):
    module = getattr(pipe, name, None)
    if module is None:
        raise InvalidInputError(f"the pipeline has no {name} (was it loaded with components=...?)")
    return module


def config_dict(config) -> dict:
    """A plain dict from a diffusers FrozenDict or a transformers PretrainedConfig."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)
