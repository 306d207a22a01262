"""Transcoder folders written by other tools, read into the app's `Transcoder` / `TranscoderSet`, and circuit-tracer
cross-layer transcoders (CLTs) into `CrossLayerTranscoder`. Every size a config declares is checked against the
safetensors headers (themselves checked against the file) before a tensor is read.

Sources (facts only): circuit-tracer transcoder/single_layer_transcoder.py (load_gemma_scope_2_transcoder) and
cross_layer_transcoder.py (load_clt); SAELens saes/transcoder.py; google/gemma-scope-2-* transcoder config.json files.

  Gemma Scope 2: config.json {hf_hook_point_in, hf_hook_point_out, width, architecture "jump_relu",
    affine_connection, type "transcoder"} + params.safetensors {w_enc [d_model, width], w_dec [width, d_model], b_enc,
    b_dec, threshold [width], affine_skip_connection [d_model, d_model] applied as x @ A}; f = relu(pre)*(pre > thr).
  SAELens: cfg.json {architecture transcoder / skip_transcoder / jumprelu_transcoder / jumprelu_skip_transcoder, d_in,
    d_sae, d_out, hook_name, hook_name_out (top level or in metadata)} + sae_weights.safetensors {W_enc [d_in, d_sae],
    W_dec [d_sae, d_out], b_enc, b_dec [d_out], threshold, W_skip [d_out, d_in] applied as x @ W_skip.T}.
  circuit-tracer CLT: config.yaml {model_kind: cross_layer_transcoder, feature_input_hook, feature_output_hook} +
    W_enc_{i}.safetensors {W_enc_{i} [d_t, d_model], b_enc_{i}, b_dec_{i}, threshold_{i}} + W_dec_{i}.safetensors
    {W_dec_{i} [d_t, n_layers - i, d_model]}: a feature read at layer i writes W_dec_{i}[:, j - i] into layer j >= i;
    f = pre * (pre > threshold) (circuit-tracer's JumpReLU).

CLTs (and circuit-tracer per-layer sets) may read hook_resid_mid, the residual stream before the MLP's norm: the
graph reads it at that norm's input. Gemma Scope 2 and SAELens folders must read the MLP's normalised input.

Per-layer sets may be one layer's folder or a parent folder of per-layer folders; the layer comes from the hook
names in each config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from desktop_app.engine.bounded_io import BoundedReadError, loads_json, read_regular_bytes
from desktop_app.engine.errors import SAEError
from desktop_app.engine.file_checks import nonfinite_problem, safetensors_problem, saelens_cfg_problem
from desktop_app.engine.sae.formats import CFG_FILE as SAELENS_CFG
from desktop_app.engine.sae.formats import WEIGHTS_FILE as SAELENS_WEIGHTS
from desktop_app.engine.sae.formats import _read_json, _read_safetensors
from desktop_app.engine.transcoders import RESID_MID_HOOKS, Transcoder, TranscoderSet, check_hooks

GS2_CFG, GS2_WEIGHTS, CT_CFG = "config.json", "params.safetensors", "config.yaml"
FORMAT_NAMES = {CT_CFG: "circuit-tracer (config.yaml)", GS2_CFG: "Gemma Scope 2 (config.json)",
                SAELENS_CFG: "SAELens (cfg.json)"}
# TransformerLens / circuit-tracer names of the MLP's normalised input and of its output
NORMED_INPUT_HOOKS = ("ln2.hook_normalized", "mlp.hook_in")
MLP_OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
# transformers module paths (Gemma Scope 2 hf_hook_point_*): the MLP's normalised input, the MLP's output
_HF_INPUTS = ("pre_feedforward_layernorm.output", "post_attention_layernorm.output", "ln_2.output", "mlp.input")
_HF_OUTPUTS = ("mlp.output", "post_feedforward_layernorm.output")
_HF_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
_TL_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
SAELENS_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
MAX_SUBFOLDERS = 4096
CONFIG_MAX_BYTES = 1 << 20


# ---- cross-layer transcoders ----------------------------------------------------------------------------------

@dataclass
class CrossLayerTranscoder:
    """Features read at layer l (from the MLP's normalised input there) and write into the MLP outputs of layers
    l..n_layers-1: out[j] = b_dec[j] + sum over i <= j of acts[i] @ W_dec[i][:, j - i]."""
    W_enc: torch.Tensor  # [n_layers, d_transcoder, d_model]
    b_enc: torch.Tensor  # [n_layers, d_transcoder]
    W_dec: list[torch.Tensor]  # W_dec[i]: [d_transcoder, n_layers - i, d_model]
    b_dec: torch.Tensor  # [n_layers, d_model]
    activation: str = "relu"  # relu | jumprelu
    threshold: torch.Tensor | None = None  # [n_layers, d_transcoder]
    config: dict = field(default_factory=dict)
    cross_layer: ClassVar[bool] = True  # per-layer TranscoderSets have no such attribute

    def __len__(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[2]

    @property
    def d_transcoder(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc[layer].T + self.b_enc[layer]
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        return torch.relu(pre)

    def decode(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        """acts[i]: the features read at layer i [..., d_transcoder] -> what every layer's MLP output becomes."""
        n = len(self)
        return [self.b_dec[j] + sum((acts[i] @ self.W_dec[i][:, j - i] for i in range(j + 1)),
                                    torch.zeros_like(self.b_dec[j])) for j in range(n)]

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decode([self.encode(i, x) for i, x in enumerate(xs)])


# ---- entry point ----------------------------------------------------------------------------------------------

def load_other_format(folder, n_layers: int | None, d_model: int | None):
    """A TranscoderSet (Gemma Scope 2 or SAELens folders) or a CrossLayerTranscoder; None when `folder` is a
    circuit-tracer per-layer set, which `transcoders.load_transcoder_set` reads itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"{folder} is not a folder; choose a transcoder folder (circuit-tracer config.yaml, Gemma "
                       "Scope 2 config.json + params.safetensors, or SAELens cfg.json + sae_weights.safetensors).")
    fmt = folder_format(folder)
    if fmt == CT_CFG:
        from desktop_app.engine.transcoders import parse_flat_yaml

        cfg_path = folder / CT_CFG
        if cfg_path.stat().st_size > CONFIG_MAX_BYTES:
            return None  # the circuit-tracer reader refuses it in its own sentence
        cfg = parse_flat_yaml(cfg_path.read_text(encoding="utf-8", errors="replace"), str(cfg_path))
        if cfg.get("model_kind") == "cross_layer_transcoder":
            return load_clt(folder, cfg, n_layers, d_model)
        return None
    if fmt is not None:
        layers = [_inspect(folder, fmt)]
    else:
        subs = _subfolders(folder)
        found = {sub: f for sub in subs for f in [folder_format(sub)] if f is not None}
        kinds = sorted(set(found.values()))
        if len(kinds) > 1:
            raise SAEError(f"{folder} mixes transcoder formats ({' and '.join(FORMAT_NAMES[k] for k in kinds)}); "
                           "keep one format per set.")
        if not found or kinds == [CT_CFG]:
            raise SAEError(f"{folder} holds no transcoders: choose a circuit-tracer set (config.yaml), Gemma Scope 2 "
                           "transcoder folders (config.json + params.safetensors) or SAELens transcoder folders "
                           "(cfg.json + sae_weights.safetensors), or the folder above per-layer ones.")
        layers = [_inspect(sub, f) for sub, f in found.items()]
    _check_coverage(layers, folder, n_layers, d_model)
    loaded = [(_load_gs2 if spec.fmt == GS2_CFG else _load_saelens)(spec) for spec in sorted(layers, key=_by_layer)]
    first = layers[0]
    config = {"format": "gemma_scope_2" if first.fmt == GS2_CFG else "saelens",
              "model_name": first.model_name, "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "hook_mlp_out", "activation": loaded[0].activation,
              "output_after_post_norm": any(s.post_norm for s in layers),
              "hooks": [[s.hook_in, s.hook_out] for s in sorted(layers, key=_by_layer)],
              "sources": [str(s.folder) for s in sorted(layers, key=_by_layer)]}
    return TranscoderSet(loaded, config)


def folder_format(folder: Path) -> str | None:
    """Which config file marks `folder`: config.yaml, config.json or cfg.json; refused when it holds several."""
    marks = [name for name in (CT_CFG, GS2_CFG, SAELENS_CFG) if (folder / name).is_file()]
    if len(marks) > 1:
        raise SAEError(f"{folder} mixes transcoder formats ({' and '.join(FORMAT_NAMES[m] for m in marks)}); keep "
                       "one format per folder.")
    return marks[0] if marks else None


def _subfolders(folder: Path) -> list[Path]:
    subs = []
    try:
        for entry in folder.iterdir():
            if len(subs) >= MAX_SUBFOLDERS:
                raise SAEError(f"{folder} holds more than {MAX_SUBFOLDERS} folders, more than any transcoder set has.")
            if entry.is_dir():
                subs.append(entry)
    except OSError as exc:
        raise SAEError(f"{folder} cannot be listed ({exc.strerror or exc}); check its permissions.") from exc
    return sorted(subs)


# ---- per-layer folders: what their configs and headers say (nothing loaded yet) -------------------------------

@dataclass
class _LayerSpec:
    folder: Path
    fmt: str
    layer: int
    hook_in: str
    hook_out: str
    d_model: int
    weights: Path
    shapes: dict
    activation: str
    skip_key: str | None
    model_name: str = ""
    post_norm: bool = False


def _by_layer(spec: _LayerSpec) -> int:
    return spec.layer


def _inspect(folder: Path, fmt: str) -> _LayerSpec:
    if fmt == CT_CFG:
        raise SAEError(f"{folder} is a circuit-tracer set inside another set; choose that folder itself.")
    return _inspect_gs2(folder) if fmt == GS2_CFG else _inspect_saelens(folder)


def _read_config_json(path: Path) -> dict:
    try:
        cfg = loads_json(read_regular_bytes(path, CONFIG_MAX_BYTES))
    except (OSError, ValueError) as exc:  # ValueError: JSON, UTF-8 and BoundedReadError
        why = str(exc) if isinstance(exc, BoundedReadError) else exc.__class__.__name__
        raise SAEError(f"{path} is not a readable JSON file ({why}); repair or replace it.") from exc
    if not isinstance(cfg, dict):
        raise SAEError(f"{path} does not hold a JSON object, so it is not a transcoder config.")
    return cfg


def header_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape from a safetensors header that agrees with its file (nothing is read but the header)."""
    from safetensors import safe_open

    if not path.is_file():
        raise SAEError(f"{path.parent} has no {path.name}; copy the weights file next to its config.")
    problem = safetensors_problem(path)
    if problem:
        raise SAEError(f"{path} {problem}; copy it again.")
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _inspect_gs2(folder: Path) -> _LayerSpec:
    where = folder / GS2_CFG
    cfg = _read_config_json(where)
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if not isinstance(hook_in, str):
        raise SAEError(f"{where} has no hf_hook_point_in, so it is not a Gemma Scope 2 transcoder config.")
    kind = cfg.get("type", "transcoder")
    if kind != "transcoder" or not isinstance(hook_out, str) or hook_out == hook_in:
        what = "SAE" if kind in ("sae", "transcoder") else repr(kind)
        raise SAEError(f"{where} describes a Gemma Scope 2 {what} (it reads {hook_in} and writes "
                       f"{hook_out if isinstance(hook_out, str) else 'the same'}), not a per-layer transcoder.")
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise SAEError(f"{where} has architecture {cfg.get('architecture')!r}; Gemma Scope 2 transcoders are "
                       "jump_relu.")
    layer, post_norm = _hf_hooks(hook_in, hook_out, where)
    weights = folder / GS2_WEIGHTS
    shapes = header_shapes(weights)
    missing = [k for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if k not in shapes]
    if missing or len(shapes["w_enc"]) != 2:
        raise SAEError(f"{weights} lacks {', '.join(missing) or 'a 2-D w_enc'}, so it is not Gemma Scope 2 transcoder "
                       "weights.")
    d_model, width = shapes["w_enc"]
    declared = cfg.get("width")
    if declared is not None and declared != width:
        raise SAEError(f"{where} declares width {declared!r} but w_enc in {weights.name} has shape "
                       f"{shapes['w_enc']} ({width} features); the config and weights do not belong together.")
    affine = cfg.get("affine_connection", False)
    has_skip = "affine_skip_connection" in shapes
    if not isinstance(affine, bool) or affine != has_skip:
        raise SAEError(f"{where} declares affine_connection {affine!r} but {weights.name} "
                       f"{'holds' if has_skip else 'has no'} affine_skip_connection.")
    expected = {"w_enc": (d_model, width), "w_dec": (width, d_model), "b_enc": (width,), "b_dec": (d_model,),
                "threshold": (width,)}
    if has_skip:
        expected["affine_skip_connection"] = (d_model, d_model)
    _check_shapes(shapes, expected, weights, f"d_model {d_model}, width {width}")
    return _LayerSpec(folder, GS2_CFG, layer, hook_in, hook_out, d_model, weights, shapes, "jumprelu",
                      "affine_skip_connection" if has_skip else None, str(cfg.get("model_name", "")), post_norm)


def _hf_hooks(hook_in: str, hook_out: str, where: Path) -> tuple[int, bool]:
    m_in, m_out = _HF_LAYER.match(hook_in), _HF_LAYER.match(hook_out)
    if not m_in or m_in.group(2) not in _HF_INPUTS:
        raise SAEError(f"{where} reads {hook_in!r}, but attribution graphs here need transcoders that read the MLP's "
                       "input after its norm (e.g. model.layers.3.pre_feedforward_layernorm.output).")
    if not m_out or m_out.group(2) not in _HF_OUTPUTS:
        raise SAEError(f"{where} writes {hook_out!r}, but a transcoder here must reconstruct the MLP's output "
                       "(e.g. model.layers.3.mlp.output).")
    if m_in.group(1) != m_out.group(1):
        raise SAEError(f"{where} reads layer {m_in.group(1)} but writes layer {m_out.group(1)}; a per-layer "
                       "transcoder reads and writes one layer's MLP.")
    if m_in.group(2) == "post_attention_layernorm.output" and m_out.group(2) == "post_feedforward_layernorm.output":
        raise SAEError(f"{where} reads {hook_in!r}, which in a model with post-norms is the attention's output, not "
                       "the MLP's input.")
    return int(m_in.group(1)), m_out.group(2) == "post_feedforward_layernorm.output"


def _inspect_saelens(folder: Path) -> _LayerSpec:
    where = folder / SAELENS_CFG
    raw = _read_json(where)
    problem = saelens_cfg_problem(raw)
    if problem:
        raise SAEError(f"{where} {problem}; repair the transcoder's cfg.json.")
    arch = raw.get("architecture") or "standard"
    if arch not in SAELENS_ARCHITECTURES:
        raise SAEError(f"{where} describes an SAELens {arch} SAE, not a transcoder (architecture "
                       f"{', '.join(SAELENS_ARCHITECTURES)}).")
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    hook_in = meta.get("hook_name") or raw.get("hook_name")
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out")
    if not isinstance(hook_in, str) or not isinstance(hook_out, str):
        raise SAEError(f"{where} does not name both the hook it reads (hook_name) and the hook it writes "
                       "(hook_name_out), so it cannot be placed on a layer's MLP.")
    layer = _tl_hooks(hook_in, hook_out, where)
    if raw.get("apply_b_dec_to_input"):
        raise SAEError(f"{where} sets apply_b_dec_to_input, which a transcoder cannot do (its b_dec is an output).")
    norm = raw.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise SAEError(f"{where} normalises its input ({norm!r}); only transcoders that read the raw MLP input are "
                       "supported.")
    d_in, d_sae = raw.get("d_in"), raw.get("d_sae")
    d_out = raw.get("d_out", d_in)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d_in, d_sae, d_out)):
        raise SAEError(f"{where} lacks whole-number d_in, d_sae and d_out, so it is not a complete SAELens transcoder "
                       "cfg.json.")
    if d_in != d_out:
        raise SAEError(f"{where} reads width {d_in} but writes width {d_out}; an MLP's input and output both have the "
                       "model's width.")
    weights = folder / SAELENS_WEIGHTS
    shapes = header_shapes(weights)
    jump, skip = arch.startswith("jumprelu"), arch.endswith("skip_transcoder")
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    if jump:
        expected["log_threshold" if "log_threshold" in shapes and "threshold" not in shapes else "threshold"] = (d_sae,)
    if skip:
        expected["W_skip"] = (d_out, d_in)
    elif "W_skip" in shapes:
        raise SAEError(f"{weights} holds W_skip but {where} says architecture {arch}, which has no skip connection.")
    _check_shapes(shapes, expected, weights, f"d_in {d_in}, d_sae {d_sae}, d_out {d_out}")
    model_name = meta.get("model_name") or raw.get("model_name") or ""
    return _LayerSpec(folder, SAELENS_CFG, layer, hook_in, hook_out, d_in, weights, shapes,
                      "jumprelu" if jump else "relu", "W_skip" if skip else None, str(model_name))


def _tl_hooks(hook_in: str, hook_out: str, where: Path) -> int:
    m_in, m_out = _TL_LAYER.match(hook_in), _TL_LAYER.match(hook_out)
    if not m_in or m_in.group(2) not in NORMED_INPUT_HOOKS:
        raise SAEError(f"{where} reads {hook_in!r}, but attribution graphs here need transcoders that read the MLP's "
                       f"input after its norm (blocks.N.{' or blocks.N.'.join(NORMED_INPUT_HOOKS)}).")
    if not m_out or m_out.group(2) not in MLP_OUTPUT_HOOKS:
        raise SAEError(f"{where} writes {hook_out!r}, but a transcoder here must reconstruct the MLP's output "
                       f"(blocks.N.{' or blocks.N.'.join(MLP_OUTPUT_HOOKS)}).")
    if m_in.group(1) != m_out.group(1):
        raise SAEError(f"{where} reads layer {m_in.group(1)} but writes layer {m_out.group(1)}; a per-layer "
                       "transcoder reads and writes one layer's MLP.")
    return int(m_in.group(1))


def _check_shapes(shapes: dict, expected: dict, weights: Path, what: str) -> None:
    for name, shape in expected.items():
        if name not in shapes:
            raise SAEError(f"{weights} has no tensor {name!r}, which this transcoder needs.")
        if tuple(shapes[name]) != shape:
            raise SAEError(f"{name} in {weights} has shape {tuple(shapes[name])} but {what} make it {shape}; the "
                           "config and weights do not belong together.")


def _check_coverage(layers: list[_LayerSpec], folder: Path, n_layers: int | None, d_model: int | None) -> None:
    by_layer: dict[int, list[_LayerSpec]] = {}
    for spec in layers:
        by_layer.setdefault(spec.layer, []).append(spec)
    for layer, specs in sorted(by_layer.items()):
        if len(specs) > 1:
            raise SAEError(f"{folder} holds {len(specs)} transcoders for layer {layer} "
                           f"({', '.join(s.folder.name for s in specs)}); keep one folder per layer.")
    top = max(by_layer) + 1
    if n_layers is not None and top > n_layers:
        raise SAEError(f"the transcoder set has transcoders for {top} layers but the model has {n_layers} layers.")
    missing = [i for i in range(n_layers if n_layers is not None else top) if i not in by_layer]
    if missing:
        raise SAEError(f"the transcoder set in {folder} misses layer(s) {missing}; every layer needs its transcoder.")
    widths = sorted({s.d_model for s in layers})
    if len(widths) != 1 or (d_model is not None and widths != [d_model]):
        raise SAEError(f"the transcoders have d_model {widths} but the model's d_model is {d_model}.")


def _finite(state: dict, weights: Path) -> dict:
    state = {k: v.float() for k, v in state.items()}
    problem = nonfinite_problem(state)
    if problem:
        raise SAEError(f"{weights} {problem}; the transcoder is damaged, so use another copy of it.")
    return state


def _jump_threshold(threshold: torch.Tensor) -> torch.Tensor:
    # the app's JumpReLU is pre * (pre > t); relu(pre) * (pre > t) is the same with t clamped at 0
    return threshold.clamp_min(0.0)


def _load_gs2(spec: _LayerSpec) -> Transcoder:
    t = _finite(_read_safetensors(spec.weights), spec.weights)
    skip = t["affine_skip_connection"].T.contiguous() if spec.skip_key else None  # x @ A == x @ (A.T).T
    return Transcoder(t["w_enc"].T.contiguous(), t["w_dec"], t["b_enc"], t["b_dec"], "jumprelu",
                      _jump_threshold(t["threshold"]), None, skip)


def _load_saelens(spec: _LayerSpec) -> Transcoder:
    t = _finite(_read_safetensors(spec.weights), spec.weights)
    threshold = None
    if spec.activation == "jumprelu":
        threshold = _jump_threshold(t["threshold"] if "threshold" in t else t["log_threshold"].exp())
    return Transcoder(t["W_enc"].T.contiguous(), t["W_dec"], t["b_enc"], t["b_dec"], spec.activation, threshold,
                      None, t.get("W_skip") if spec.skip_key else None)


# ---- circuit-tracer cross-layer transcoders -------------------------------------------------------------------

def load_clt(folder: Path, cfg: dict, n_layers: int | None, d_model: int | None) -> CrossLayerTranscoder:
    if cfg.get("transcoders"):
        raise SAEError(f"{folder / CT_CFG} lists per-layer files for a cross-layer transcoder (the Gemma Scope 2 CLT "
                       "layout), which is not supported; only circuit-tracer's W_enc_{i} / W_dec_{i} files are.")
    hook_in = str(cfg.get("feature_input_hook", "hook_resid_mid"))  # circuit-tracer's default for CLTs
    hook_out = str(cfg.get("feature_output_hook", "hook_mlp_out"))
    check_hooks("the cross-layer transcoders", hook_in, hook_out, NORMED_INPUT_HOOKS, MLP_OUTPUT_HOOKS)
    found = sorted(int(m.group(1)) for p in folder.glob("W_enc_*.safetensors")
                   for m in [re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)] if m)
    count = n_layers if n_layers is not None else (max(found) + 1 if found else 0)
    if n_layers is not None and found and max(found) + 1 > n_layers:
        raise SAEError(f"the cross-layer transcoder has encoders for {max(found) + 1} layers but the model has "
                       f"{n_layers} layers.")
    missing = [i for i in range(count) if i not in found or not (folder / f"W_dec_{i}.safetensors").is_file()]
    if not count or missing:
        raise SAEError(f"the cross-layer transcoder in {folder} misses layer(s) {missing or [0]}; every layer needs "
                       "W_enc_{i}.safetensors and W_dec_{i}.safetensors.")
    enc_shapes = [header_shapes(folder / f"W_enc_{i}.safetensors") for i in range(count)]
    dec_shapes = [header_shapes(folder / f"W_dec_{i}.safetensors") for i in range(count)]
    first = enc_shapes[0].get("W_enc_0", ())
    if len(first) != 2:
        raise SAEError(f"{folder / 'W_enc_0.safetensors'} has no 2-D tensor W_enc_0, so it is not a circuit-tracer "
                       "cross-layer transcoder.")
    d_t, width = first
    if d_model is not None and width != d_model:
        raise SAEError(f"the transcoders have d_model [{width}] but the model's d_model is {d_model}.")
    jump = "threshold_0" in enc_shapes[0]
    for i in range(count):
        expected = {f"W_enc_{i}": (d_t, width), f"b_enc_{i}": (d_t,), f"b_dec_{i}": (width,)}
        if jump:
            expected[f"threshold_{i}"] = (d_t,)
        path = folder / f"W_enc_{i}.safetensors"
        extra = sorted(set(enc_shapes[i]) - set(expected))
        if extra:
            raise SAEError(f"{path} holds {', '.join(extra)}, which circuit-tracer's cross-layer transcoder format "
                           "does not define (every layer's encoder file holds the same tensors).")
        _check_shapes(enc_shapes[i], expected, path, f"d_transcoder {d_t}, d_model {width}")
        dec_path = folder / f"W_dec_{i}.safetensors"
        _check_shapes(dec_shapes[i], {f"W_dec_{i}": (d_t, count - i, width)}, dec_path,
                      f"layer {i} of {count}, d_transcoder {d_t}, d_model {width}")
    enc = [_finite(_read_safetensors(folder / f"W_enc_{i}.safetensors"), folder / f"W_enc_{i}.safetensors")
           for i in range(count)]
    dec = [_finite(_read_safetensors(folder / f"W_dec_{i}.safetensors"), folder / f"W_dec_{i}.safetensors")
           [f"W_dec_{i}"] for i in range(count)]
    config = {**cfg, "format": "circuit_tracer_clt", "feature_input_hook": hook_in, "feature_output_hook": hook_out,
              "activation": "jumprelu" if jump else "relu"}
    return CrossLayerTranscoder(torch.stack([e[f"W_enc_{i}"] for i, e in enumerate(enc)]),
                                torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]), dec,
                                torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]),
                                "jumprelu" if jump else "relu",
                                torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)]) if jump else None,
                                config)
