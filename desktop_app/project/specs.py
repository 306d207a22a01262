"""Experiment specifications: a model reference, prompts, and one frozen dataclass per analysis kind.

Every spec validates itself in __post_init__ and raises SpecError with one sentence naming the field, so a
spec that exists is a spec that can be handed to the engine. Specs are immutable values: edits make a new
spec with dataclasses.replace, which is what the undo commands store.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import SHORT_COMPONENTS, parse_hook_name
from desktop_app.engine.quantize import QUANTIZE

DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
POSITIONS = ("each", "all")
DIRECTIONS = ("denoise", "noise")
METRICS = ("logit_diff", "logit_diff_recovered", "answer_prob", "kl_div")
TRACING_COMPONENTS = ("resid_post", "mlp_out", "attn_out")
ABLATION_METHODS = ("zero", "mean", "noise", "resample")
MEAN_OVER = ("prompts", "positions")


# ---- field checks: each raises SpecError naming `where`.field --------------------------------------------

def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their own fields this way


def _check_str(where: str, name: str, value, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str):
        raise SpecError(f"{where}: field '{name}' must be a text string, not {value!r}.")
    if not empty_ok and not value.strip():
        raise SpecError(f"{where}: field '{name}' must not be empty; give it a value.")


def _check_choice(where: str, name: str, value, options) -> None:
    if value not in options:
        raise SpecError(f"{where}: field '{name}' is {value!r}; use one of {', '.join(options)}.")


def _check_bool(where: str, name: str, value, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, bool):
        extra = ", true, or null" if none_ok else " or true"
        raise SpecError(f"{where}: field '{name}' must be false{extra}, not {value!r}.")


def _check_int(where: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where}: field '{name}' must be a whole number >= {minimum}, not {value!r}.")


def _check_number(where: str, name: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise SpecError(f"{where}: field '{name}' must be a number >= {minimum}, not {value!r}.")
    return float(value)


def _check_component(where: str, name: str, value, options=SHORT_COMPONENTS, *, full_names: bool = False):
    if full_names and isinstance(value, str) and value.startswith(("blocks.", "hook_", "ln_final")):
        _check_hook(where, name, value)
        return
    _check_choice(where, name, value, options)


def _check_hook(where: str, name: str, value) -> None:
    _check_str(where, name, value)
    try:
        parse_hook_name(value)
    except ValueError:
        raise SpecError(f"{where}: field '{name}' is {value!r}, which is not a hook point name; "
                        f"use one like blocks.0.hook_resid_pre.") from None


def _normalise_layers(obj, where: str) -> None:
    layers = obj.layers
    if layers is None:
        return
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise SpecError(f"{where}: field 'layers' must be a list of layer numbers or null, not {layers!r}.")
    layers = tuple(layers)
    for layer in layers:
        _check_int(where, "layers", layer, 0)
    if not layers:
        raise SpecError(f"{where}: field 'layers' is an empty list; leave it out to use every layer.")
    _set(obj, "layers", layers)


# ---- model and prompts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    path: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    config_hash: str = ""  # filled from the loaded model; lets a project notice that the folder changed
    quantize: str = "none"  # none / int8 / int4 (contract 6.0)
    # filled from the loaded model: its weights' bytes as stored (after quantisation); not part of its identity
    memory_bytes: int = dataclasses.field(default=0, compare=False)

    def __post_init__(self):
        if hasattr(self.path, "__fspath__"):
            _set(self, "path", str(self.path))
        _check_str("model", "path", self.path)
        _check_choice("model", "dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise SpecError(f"model: field 'device' is {self.device!r}; use auto, cpu, cuda, cuda:N or mps.")
        _check_bool("model", "trust_remote_code", self.trust_remote_code)
        _check_str("model", "config_hash", self.config_hash, empty_ok=True)
        _check_choice("model", "quantize", self.quantize, QUANTIZE)
        _check_int("model", "memory_bytes", self.memory_bytes, 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["config_hash"]:
            del d["config_hash"]
        if d["quantize"] == "none":  # files without quantisation stay as older versions wrote them
            del d["quantize"]
        if not d["memory_bytes"]:
            del d["memory_bytes"]
        return d

    @classmethod
    def from_dict(cls, d) -> "ModelRef":
        return _construct(cls, d, "model")


@dataclass(frozen=True)
class Prompts:
    clean: str
    corrupted: str = ""
    answer: str = ""
    wrong_answer: str = ""
    prepend_bos: bool | None = None

    def __post_init__(self):
        for name in ("clean", "corrupted", "answer", "wrong_answer"):
            _check_str("prompts", name, getattr(self, name), empty_ok=True)
        _check_bool("prompts", "prepend_bos", self.prepend_bos, none_ok=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["prepend_bos"] is None:
            del d["prepend_bos"]
        return d

    @classmethod
    def from_dict(cls, d) -> "Prompts":
        return _construct(cls, d, "prompts")


# ---- analyses --------------------------------------------------------------------------------------------

ANALYSIS_KINDS: dict[str, type["AnalysisSpec"]] = {}


def register(kind: str):
    def deco(cls):
        cls.kind = kind
        ANALYSIS_KINDS[kind] = cls
        return cls
    return deco


@dataclass(frozen=True)
class AnalysisSpec:
    """Base of every analysis spec. Subclasses add fields and extend validate()."""
    kind: ClassVar[str] = ""
    name: str

    def __post_init__(self):
        self.validate(f"analysis {self.name!r}" if isinstance(self.name, str) else "analysis")

    def validate(self, where: str) -> None:
        _check_str(where, "name", self.name)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for f in dataclasses.fields(self):
            if f.name != "name":
                value = getattr(self, f.name)
                d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


@register("activation_patching")
@dataclass(frozen=True)
class ActivationPatchingSpec(AnalysisSpec):
    component: str = "resid_pre"
    positions: str = "each"
    direction: str = "denoise"
    metric: str = "logit_diff_recovered"
    layers: tuple[int, ...] | None = None  # None: every layer

    def validate(self, where):
        super().validate(where)
        _check_component(where, "component", self.component)
        _check_choice(where, "positions", self.positions, POSITIONS)
        _check_choice(where, "direction", self.direction, DIRECTIONS)
        _check_choice(where, "metric", self.metric, METRICS)
        _normalise_layers(self, where)


@register("causal_tracing")
@dataclass(frozen=True)
class CausalTracingSpec(AnalysisSpec):
    subject: str  # text inside the clean prompt whose embeddings get noised
    noise: float = 3.0  # a multiple of the embedding standard deviation
    samples: int = 10
    component: str = "resid_post"
    window: int = 10
    seed: int = 0

    def validate(self, where):
        super().validate(where)
        _check_str(where, "subject", self.subject)
        _set(self, "noise", _check_number(where, "noise", self.noise, 0.0))
        _check_int(where, "samples", self.samples, 1)
        _check_choice(where, "component", self.component, TRACING_COMPONENTS)
        _check_int(where, "window", self.window, 1)
        _check_int(where, "seed", self.seed, 0)


@register("attribution_patching")
@dataclass(frozen=True)
class AttributionPatchingSpec(AnalysisSpec):
    component: str = "resid_pre"
    positions: str = "each"
    direction: str = "denoise"
    metric: str = "logit_diff_recovered"

    def validate(self, where):
        super().validate(where)
        _check_component(where, "component", self.component)
        _check_choice(where, "positions", self.positions, POSITIONS)
        _check_choice(where, "direction", self.direction, DIRECTIONS)
        _check_choice(where, "metric", self.metric, METRICS)


@register("ablation")
@dataclass(frozen=True)
class AblationSpec(AnalysisSpec):
    component: str = "head_out"  # a short component (every layer) or one full hook point name
    method: str = "zero"
    positions: str = "all"
    metric: str = "logit_diff"
    layers: tuple[int, ...] | None = None
    noise: float = 1.0  # for method "noise": a multiple of the activation's standard deviation
    seed: int = 0
    mean_over: str = "prompts"  # for method "mean": the reference prompts, or the clean prompt's positions
    reference_prompts: tuple[str, ...] = ()  # for method "mean" over prompts
    source_prompt: str | None = None  # for method "resample"; None: the corrupted prompt

    def validate(self, where):
        super().validate(where)
        _check_component(where, "component", self.component, full_names=True)
        _check_choice(where, "method", self.method, ABLATION_METHODS)
        _check_choice(where, "positions", self.positions, POSITIONS)
        _check_choice(where, "metric", self.metric, METRICS)
        _normalise_layers(self, where)
        _set(self, "noise", _check_number(where, "noise", self.noise, 0.0))
        _check_int(where, "seed", self.seed, 0)
        _check_choice(where, "mean_over", self.mean_over, MEAN_OVER)
        refs = self.reference_prompts
        if isinstance(refs, (str, bytes)) or not hasattr(refs, "__iter__"):
            raise SpecError(f"{where}: field 'reference_prompts' must be a list of prompts, not {refs!r}.")
        _set(self, "reference_prompts", tuple(refs))
        for prompt in self.reference_prompts:
            _check_str(where, "reference_prompts", prompt)
        if self.source_prompt is not None:
            _check_str(where, "source_prompt", self.source_prompt)


@register("sae_features")
@dataclass(frozen=True)
class SAEFeaturesSpec(AnalysisSpec):
    sae: str  # SAELens folder, Gemma Scope params.npz or a safetensors file
    hook: str | None = None  # needed when the SAE file names none
    prompt: str = "clean"  # "clean", "corrupted" or literal text
    top_k: int = 10  # 0: all features

    def validate(self, where):
        super().validate(where)
        if hasattr(self.sae, "__fspath__"):
            _set(self, "sae", str(self.sae))
        _check_str(where, "sae", self.sae)
        if self.hook is not None:
            _check_hook(where, "hook", self.hook)
        _check_str(where, "prompt", self.prompt)
        _check_int(where, "top_k", self.top_k, 0)


# ---- dict <-> spec ---------------------------------------------------------------------------------------

def _construct(cls, d, where: str):
    if not isinstance(d, dict):
        raise SpecError(f"{where} must be a JSON object with named fields, not {type(d).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown field '{unknown[0]}'; known fields are {', '.join(fields)}.")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in d:
            raise SpecError(f"{where} is missing the field '{name}'; add it.")
    return cls(**d)


def analysis_from_dict(d) -> AnalysisSpec:
    """Build an analysis spec from its JSON form {"name": ..., "kind": ..., fields...}."""
    if not isinstance(d, dict):
        raise SpecError(f"an analysis must be a JSON object with a 'name' and a 'kind', not {d!r}.")
    where = f"analysis {d['name']!r}" if isinstance(d.get("name"), str) else "analysis"
    if "kind" not in d:
        raise SpecError(f"{where} is missing the field 'kind'; use one of {', '.join(ANALYSIS_KINDS)}.")
    kind = d["kind"]
    cls = ANALYSIS_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SpecError(f"{where} has unknown kind {kind!r}; known kinds are {', '.join(ANALYSIS_KINDS)}.")
    fields = {k: v for k, v in d.items() if k != "kind"}
    return _construct(cls, fields, where)


def to_dict(spec) -> dict[str, Any]:
    """JSON form of any spec in this module (ModelRef, Prompts or an analysis)."""
    return spec.to_dict()
