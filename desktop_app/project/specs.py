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
POSITIONS = ("each", "all", "named")  # named: the position names of a templated dataset
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


def _normalise_metric(obj, where: str) -> None:
    """A metric is a built-in name or an expression (contract 6.2): {"expression": text} becomes the text,
    whose syntax is checked here (the tokens it names are checked against the model when it runs)."""
    value = obj.metric
    if isinstance(value, dict):
        if set(value) != {"expression"} or not isinstance(value["expression"], str):
            raise SpecError(f"{where}: field 'metric' must be one of {', '.join(METRICS)} or an object "
                            "{\"expression\": \"logit(answer) - logit(wrong)\"}.")
        value = value["expression"]
        _set(obj, "metric", value)
    if not isinstance(value, str) or value in METRICS:
        return
    if re.fullmatch(r"\s*\w+\s*", value):
        raise SpecError(f"{where}: field 'metric' is {value!r}; use one of {', '.join(METRICS)} or an expression "
                        "such as {\"expression\": \"logit(answer) - logit(wrong)\"}.")
    from desktop_app.engine.metric_expr import MetricExpression

    try:
        MetricExpression(value)
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None


def _normalise_layers(obj, where: str) -> None:
    _normalise_int_list(obj, where, "layers")


# ---- field metadata: what the Analysis panel builds and what validate() checks for every kind --------------

WIDGETS = ("choice", "text", "optional_text", "int", "float", "bool", "layers", "text_list", "path", "hook")


def param(default=dataclasses.MISSING, *, widget: str, label: str = "", tip: str = "", choices=(),
          minimum=None, maximum=None, editable: bool = False, empty_ok: bool = False, step=None,
          path: bool | None = None):
    """A spec field with the metadata that builds its row in the Analysis panel and checks its value.

    widget: choice (a combo of `choices`; `editable` also takes other text, checked by the spec),
    text / optional_text (None when empty) / path, int / float (`minimum`, `maximum`, `step`), bool,
    layers (layer numbers, None = every layer), text_list (one text per line), hook (a hook point name or None).
    AnalysisSpec.validate checks every such field, so a new kind usually needs no validate() of its own.
    path: the field names a file or folder (default: widget "path"; a text_list may name one file), which an
    experiment file gives relative to itself (project/experiment.py resolves it)."""
    if widget not in WIDGETS:
        raise ValueError(f"unknown widget {widget!r}; use one of {', '.join(WIDGETS)}")
    meta = {"widget": widget, "label": label, "tip": tip, "choices": tuple(choices), "minimum": minimum,
            "maximum": maximum, "editable": editable, "empty_ok": empty_ok, "step": step,
            "path": widget == "path" if path is None else bool(path)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_range(where, name, value, minimum, maximum, what):
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}: field '{name}' must be {what} between {minimum} and {maximum}, not {value!r}.")


def _normalise_int_list(obj, where: str, name: str) -> None:
    layers = getattr(obj, name)
    if layers is None:
        return
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise SpecError(f"{where}: field '{name}' must be a list of layer numbers or null, not {layers!r}.")
    layers = tuple(layers)
    for layer in layers:
        _check_int(where, name, layer, 0)
    if not layers:
        raise SpecError(f"{where}: field '{name}' is an empty list; leave it out to use every layer.")
    _set(obj, name, layers)


def check_field(obj, where: str, f: dataclasses.Field) -> None:
    """Check (and normalise) one field of a spec from its param() metadata."""
    meta, name = f.metadata, f.name
    value = getattr(obj, name)
    widget = meta["widget"]
    if widget == "choice":
        if meta["editable"]:
            _check_str(where, name, value)
        else:
            _check_choice(where, name, value, meta["choices"])
    elif widget in ("text", "path"):
        if hasattr(value, "__fspath__"):
            value = str(value)
            _set(obj, name, value)
        _check_str(where, name, value, empty_ok=meta["empty_ok"])
    elif widget == "optional_text":
        if value is not None:
            _check_str(where, name, value)
    elif widget == "int":
        minimum = meta["minimum"] if meta["minimum"] is not None else 0
        _check_int(where, name, value, minimum)
        _check_range(where, name, value, minimum, meta["maximum"], "a whole number")
    elif widget == "float":
        minimum = meta["minimum"] if meta["minimum"] is not None else 0.0
        _set(obj, name, _check_number(where, name, value, minimum))
        _check_range(where, name, getattr(obj, name), minimum, meta["maximum"], "a number")
    elif widget == "bool":
        _check_bool(where, name, value)
    elif widget == "layers":
        _normalise_int_list(obj, where, name)
    elif widget == "text_list":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise SpecError(f"{where}: field '{name}' must be a list of texts, not {value!r}.")
        _set(obj, name, tuple(value))
        for text in getattr(obj, name):
            _check_str(where, name, text)
    elif widget == "hook":
        if value is not None:
            _check_hook(where, name, value)


def panel_fields(spec_cls) -> list[dataclasses.Field]:
    """The fields of a spec class that the Analysis panel shows (all but `name`), in declaration order."""
    return [f for f in dataclasses.fields(spec_cls) if "widget" in f.metadata]


# ---- model and prompts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    path: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    config_hash: str = ""  # filled from the loaded model; lets a project notice that the folder changed
    # filled from the loaded model: its load-time conformance checks (engine.conformance.Conformance.to_dict())
    conformance: dict | None = dataclasses.field(default=None, hash=False)
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
        if self.conformance is not None and not isinstance(self.conformance, dict):
            raise SpecError(f"model: field 'conformance' must be an object or null, not {self.conformance!r}.")
        _check_choice("model", "quantize", self.quantize, QUANTIZE)
        _check_int("model", "memory_bytes", self.memory_bytes, 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["config_hash"]:
            del d["config_hash"]
        if d["conformance"] is None:
            del d["conformance"]
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
        if "metric" in {f.name for f in dataclasses.fields(self)}:
            _normalise_metric(self, where)
        for f in panel_fields(type(self)):
            check_field(self, where, f)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for f in dataclasses.fields(self):
            if f.name != "name":
                value = getattr(self, f.name)
                d[f.name] = list(value) if isinstance(value, tuple) else value
        if isinstance(d.get("metric"), str) and d["metric"] not in METRICS:
            d["metric"] = {"expression": d["metric"]}  # contract 6.2: a written metric is an object
        return d


_COMPONENT_TIP = "Which activation is patched, in every layer (head_out: each attention head)"
_POSITIONS_TIP = "each: one cell per token position; all: every position at once"
_DIRECTION_TIP = "denoise: run corrupted, patch in clean; noise: run clean, patch in corrupted"
_METRIC_TIP = ("What is measured at the last position: a built-in metric, or an expression such as "
               "logit(answer) - logit(wrong) over logit / logprob / prob of tokens")
_LAYERS_TIP = "Layers to sweep, e.g. 0, 2, 5 (empty: every layer)"


@register("activation_patching")
@dataclass(frozen=True)
class ActivationPatchingSpec(AnalysisSpec):
    component: str = param("resid_pre", widget="choice", choices=SHORT_COMPONENTS, tip=_COMPONENT_TIP)
    positions: str = param("each", widget="choice", choices=POSITIONS, tip=_POSITIONS_TIP)
    direction: str = param("denoise", widget="choice", choices=DIRECTIONS, tip=_DIRECTION_TIP)
    metric: str = param("logit_diff_recovered", widget="choice", choices=METRICS, editable=True,
                         tip=_METRIC_TIP)
    layers: tuple[int, ...] | None = param(None, widget="layers", tip=_LAYERS_TIP)  # None: every layer


@register("causal_tracing")
@dataclass(frozen=True)
class CausalTracingSpec(AnalysisSpec):
    subject: str = param(widget="text", tip="The text inside the clean prompt whose embeddings are noised")
    noise: float = param(3.0, widget="float", minimum=0.0, step=0.5,
                         tip="Noise added to the subject's embeddings, as a multiple of the embedding std")
    samples: int = param(10, widget="int", minimum=1, maximum=10_000, tip="Noise samples averaged per cell")
    component: str = param("resid_post", widget="choice", choices=TRACING_COMPONENTS,
                           tip="Which activation is restored to its clean value")
    window: int = param(10, widget="int", minimum=1, maximum=1000,
                        tip="Layers restored around each layer (mlp_out / attn_out)")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of the noise")


@register("attribution_patching")
@dataclass(frozen=True)
class AttributionPatchingSpec(AnalysisSpec):
    component: str = param("resid_pre", widget="choice", choices=SHORT_COMPONENTS, tip=_COMPONENT_TIP)
    positions: str = param("each", widget="choice", choices=POSITIONS, tip=_POSITIONS_TIP)
    direction: str = param("denoise", widget="choice", choices=DIRECTIONS, tip=_DIRECTION_TIP)
    metric: str = param("logit_diff_recovered", widget="choice", choices=METRICS, editable=True,
                         tip=_METRIC_TIP)


@register("ablation")
@dataclass(frozen=True)
class AblationSpec(AnalysisSpec):
    # a short component (every layer) or one full hook point name
    component: str = param("head_out", widget="choice", choices=SHORT_COMPONENTS, editable=True,
                           tip="Which activation is ablated in every layer, or one hook point such as "
                               "blocks.0.hook_mlp_out")
    method: str = param("zero", widget="choice", choices=ABLATION_METHODS, tip="How an ablated activation is replaced")
    positions: str = param("all", widget="choice", choices=POSITIONS, tip=_POSITIONS_TIP)
    metric: str = param("logit_diff", widget="choice", choices=METRICS, editable=True,
                         tip=_METRIC_TIP)
    layers: tuple[int, ...] | None = param(None, widget="layers", tip=_LAYERS_TIP)
    noise: float = param(1.0, widget="float", minimum=0.0, step=0.5,
                         tip="Method noise: a multiple of the activation's standard deviation")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of the noise (method noise)")
    mean_over: str = param("prompts", widget="choice", choices=MEAN_OVER,
                           tip="Method mean: over the reference prompts, or over the clean prompt's positions")
    reference_prompts: tuple[str, ...] = param((), widget="text_list",
                                               tip="Method mean over prompts: one reference prompt per line")
    source_prompt: str | None = param(None, widget="optional_text",
                                      tip="Method resample: the prompt whose activations replace the clean ones "
                                          "(empty: the corrupted prompt)")

    def validate(self, where):
        super().validate(where)
        _check_component(where, "component", self.component, full_names=True)


@register("sae_features")
@dataclass(frozen=True)
class SAEFeaturesSpec(AnalysisSpec):
    sae: str = param(widget="path", tip="SAELens folder, Gemma Scope params.npz or a .safetensors file")
    hook: str | None = param(None, widget="hook", tip="The hook point the SAE reads (needed when its file names none)")
    prompt: str = param("clean", widget="choice", choices=("clean", "corrupted"), editable=True,
                        tip="clean, corrupted, or a literal text")
    top_k: int = param(10, widget="int", minimum=0, maximum=100_000,
                       tip="The strongest features of each token to show (0: all)")
    force_hook: bool = param(False, widget="bool",
                             tip="Apply the SAE even where its file names another hook or model (normally refused)")


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
    from desktop_app.project import kinds  # the registry imports this module; kinds of other modules join here

    kinds.load()
    where = f"analysis {d['name']!r}" if isinstance(d.get("name"), str) else "analysis"
    if "kind" not in d:
        raise SpecError(f"{where} is missing the field 'kind'; use one of {', '.join(ANALYSIS_KINDS)}.")
    kind = d["kind"]
    cls = ANALYSIS_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        broken = "".join(f" The kind module {m} failed to load ({e})." for m, e in kinds.LOAD_ERRORS.items())
        raise SpecError(f"{where} has unknown kind {kind!r}; known kinds are {', '.join(ANALYSIS_KINDS)}.{broken}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    return _construct(cls, fields, where)


def to_dict(spec) -> dict[str, Any]:
    """JSON form of any spec in this module (ModelRef, Prompts or an analysis)."""
    return spec.to_dict()
