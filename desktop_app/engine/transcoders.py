"""Per-layer transcoders (MLP input after its norm, or with feature_input_hook hook_resid_mid the residual stream
before that norm -> MLP output) in the circuit-tracer set format.

A set is a folder with `config.yaml` (flat keys: model_name, model_kind: transcoder_set, feature_input_hook,
feature_output_hook, activation relu / jumprelu / topk, k, and optionally a `transcoders:` list of file names)
and one `layer_{i}.safetensors` per layer holding W_enc [d_transcoder, d_model], W_dec [d_transcoder, d_model],
b_enc [d_transcoder], b_dec [d_model], optionally `activation_function.threshold` (JumpReLU), `k` (TopK) and
W_skip [d_model, d_model] (applied as x @ W_skip.T). YAML is read by a small parser of flat keys and one list;
nothing in the file is ever executed.

`fit_transcoders` trains a TopK set on a model's own MLP inputs / outputs (tiny models, CPU, seconds).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, Progress

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized")  # the MLP's input after its norm (TransformerLens' hook_mlp_in is before it)
# the residual stream before the MLP's norm (circuit-tracer's default for CLTs); graphs and clamp checks read it at
# the norm's input, which the frozen model keeps linear (the norm's scale is frozen)
RESID_MID_HOOKS = ("hook_resid_mid",)
OUTPUT_HOOKS = ("mlp.hook_out", "hook_mlp_out")


class DecoderRows:
    """A decoder matrix [d_transcoder, d_model] left in its safetensors file: only the rows asked for are read
    (float32), so a graph holds the rows of its active features, not every layer's whole decoder."""

    def __init__(self, path, name: str = "W_dec"):
        from safetensors import safe_open

        self.path, self.name = Path(path), name
        with safe_open(str(self.path), framework="pt") as f:
            self.shape = torch.Size(f.get_slice(name).get_shape())

    def _open(self):
        from safetensors import safe_open

        try:
            f = safe_open(str(self.path), framework="pt")
            shape = tuple(f.get_slice(self.name).get_shape())
        except Exception as exc:  # missing, unreadable or no longer a safetensors file with this tensor
            raise SAEError(f"{self.path.name} could not be read again for its decoder rows ({exc}); open the "
                           "transcoder set again.") from exc
        if shape != tuple(self.shape):
            raise SAEError(f"{self.path.name} changed on disk since it was opened ({self.name} is no longer "
                           f"{tuple(self.shape)}); open the transcoder set again.")
        return f

    def rows(self, idx) -> torch.Tensor:
        """Rows `idx` (any order, repeats allowed) as float32 [len(idx), d_model]; contiguous runs read at once."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.shape[0]):
            raise SAEError(f"decoder row out of range: {self.path.name} has {self.shape[0]} features.")
        unique = torch.unique(idx)
        out = torch.empty(len(unique), self.shape[1], dtype=torch.float32)
        with self._open() as f:
            sl = f.get_slice(self.name)
            start = 0
            for stop in range(1, len(unique) + 1):
                if stop == len(unique) or int(unique[stop]) != int(unique[stop - 1]) + 1:
                    a, b = int(unique[start]), int(unique[stop - 1]) + 1
                    out[start:stop] = sl[a:b].float()
                    start = stop
        return self._finite(out)[torch.searchsorted(unique, idx)]

    def load(self) -> torch.Tensor:
        with self._open() as f:
            return self._finite(f.get_tensor(self.name).float())

    def _finite(self, rows: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(rows).all()):
            raise SAEError(f"{self.path.name} has {int((~torch.isfinite(rows)).sum())} NaN or infinite values in "
                           f"{self.name}; the transcoder is damaged, so use another copy of it.")
        return rows


class Transcoder:
    """One layer's transcoder. W_dec may be given as a tensor or as DecoderRows (read lazily): `decoder_rows`
    and `decode` then read only the rows they need, and the `W_dec` property reads the whole matrix on first
    use and keeps it."""

    def __init__(self, W_enc: torch.Tensor, W_dec, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 activation: str = "relu", threshold: torch.Tensor | None = None, k: int | None = None,
                 W_skip: torch.Tensor | None = None):
        self.W_enc = W_enc  # [d_transcoder, d_model]
        self._W_dec = W_dec  # [d_transcoder, d_model], a tensor or DecoderRows
        self.b_enc, self.b_dec = b_enc, b_dec
        self.activation = activation
        self.threshold = threshold  # jumprelu
        self.k = k  # topk
        self.W_skip = W_skip  # [d_model, d_model]

    def __repr__(self) -> str:
        return (f"Transcoder(d_transcoder={self.d_transcoder}, d_model={self.d_model}, activation={self.activation!r}, "
                f"k={self.k}, skip={self.W_skip is not None}, decoder_loaded={self.decoder_loaded})")

    @property
    def W_dec(self) -> torch.Tensor:
        if isinstance(self._W_dec, DecoderRows):
            self._W_dec = self._W_dec.load()
        return self._W_dec

    @W_dec.setter
    def W_dec(self, value) -> None:
        self._W_dec = value

    @property
    def decoder_loaded(self) -> bool:
        return not isinstance(self._W_dec, DecoderRows)

    @property
    def decoder_shape(self) -> torch.Size:
        return self._W_dec.shape

    def decoder_rows(self, idx) -> torch.Tensor:
        """Decoder rows `idx` as float32 [len(idx), d_model], read from the file when the decoder is not loaded."""
        if isinstance(self._W_dec, DecoderRows):
            return self._W_dec.rows(idx)
        return self._W_dec[torch.as_tensor(idx, dtype=torch.long).reshape(-1)].float()

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_transcoder(self) -> int:
        return self.W_enc.shape[0]

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc.T + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        if self.activation == "topk":
            values, indices = torch.relu(pre).topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.preactivations(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_skip.T if self.W_skip is not None else torch.zeros_like(x[..., :self.b_dec.shape[0]])

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self._W_dec, DecoderRows):  # only the rows of features active somewhere in acts
            used = torch.nonzero(acts.reshape(-1, acts.shape[-1]).ne(0).any(0)).reshape(-1)
            out = acts[..., used] @ self._W_dec.rows(used)
        else:
            out = acts @ self._W_dec
        return out + self.b_dec + self.skip(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)


@dataclass
class TranscoderSet:
    layers: list[Transcoder]
    config: dict
    path: Path | None = None  # the folder it was read from (decoders are read from its files on demand)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    def decoder_rows(self, layer: int, idx) -> torch.Tensor:
        """Rows `idx` of layer `layer`'s decoder, float32 [len(idx), d_model], without loading the whole decoder."""
        return self.layers[layer].decoder_rows(idx)


def reads_resid_mid(tset) -> bool:
    """Whether a set (per-layer or cross-layer) reads the residual stream before the MLP's norm rather than the
    MLP's input after it."""
    return str((getattr(tset, "config", None) or {}).get("feature_input_hook", "")) in RESID_MID_HOOKS


def parse_flat_yaml(text: str, where: str) -> dict:
    """`key: value` lines and `key:` followed by `- item` lines; comments and blank lines skipped. Anything
    else (nested maps, anchors, tags) is refused: the config of a transcoder set needs no more."""
    out: dict = {}
    current_list = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip() or line.strip() == "---":
            continue
        stripped = line.strip()
        if stripped.startswith("- ") and current_list is not None:
            current_list.append(_scalar(stripped[2:].strip()))
            continue
        if line[0].isspace() or ":" not in stripped or stripped[0] in "&*!{[":
            raise SAEError(f"{where} line {n} is not a flat `key: value` entry, which is all a transcoder set's "
                           "config.yaml may hold.")
        key, _, value = stripped.partition(":")
        value = value.strip()
        if value:
            out[key.strip()] = _scalar(value)
            current_list = None
        else:
            current_list = out[key.strip()] = []
    return out


def _scalar(text: str):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("null", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_layer(path: Path, layer: int, activation: str | None, k: int | None,
                lazy_decoder: bool = True) -> Transcoder:
    from safetensors import safe_open

    from desktop_app.engine.file_checks import nonfinite_problem, safetensors_problem

    problem = safetensors_problem(path)
    if problem:
        raise SAEError(f"transcoder layer {layer} ({path.name}) {problem}.")
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        t = {name: f.get_tensor(name).float() for name in names if name != "W_dec" or not lazy_decoder}
    problem = nonfinite_problem(t)  # a lazy decoder's rows are checked as they are read (DecoderRows.rows)
    if problem:
        raise SAEError(f"transcoder layer {layer} ({path.name}) {problem}; the transcoder is damaged, so use another "
                       "copy of it.")
    missing = [name for name in ("W_enc", "W_dec", "b_enc", "b_dec") if name not in names]
    if missing:
        raise SAEError(f"transcoder layer {layer} ({path.name}) lacks {', '.join(missing)}.")
    w_dec = t["W_dec"] if "W_dec" in t else DecoderRows(path, "W_dec")
    threshold = t.get("activation_function.threshold", t.get("threshold"))
    if activation is None:
        activation = "jumprelu" if threshold is not None else "topk" if "k" in t else "relu"
    if activation == "topk" and k is None and "k" in t:
        k = int(t["k"].item())
    if activation == "jumprelu" and threshold is None:
        raise SAEError(f"transcoder layer {layer} ({path.name}) is JumpReLU but holds no activation_function.threshold.")
    tc = Transcoder(t["W_enc"], w_dec, t["b_enc"], t["b_dec"], activation, threshold, k, t.get("W_skip"))
    d_t, d_m = tc.W_enc.shape
    shapes_ok = (tuple(tc.decoder_shape) == (d_t, d_m) and tc.b_enc.shape == (d_t,) and tc.b_dec.shape == (d_m,)
                 and (tc.W_skip is None or tc.W_skip.shape == (d_m, d_m))
                 and (activation != "jumprelu" or threshold.numel() in (1, d_t)))
    if not shapes_ok:
        raise SAEError(f"transcoder layer {layer} ({path.name}) has tensors of inconsistent shapes "
                       f"(W_enc {tuple(tc.W_enc.shape)}, W_dec {tuple(tc.decoder_shape)}).")
    if activation == "topk" and not (isinstance(k, int) and 1 <= k <= d_t):
        raise SAEError(f"transcoder layer {layer} is TopK but its k ({k!r}) is not between 1 and {d_t}.")
    return tc


def check_hooks(what: str, hook_in: str, hook_out: str, normed_inputs, outputs) -> None:
    """Refuse (one sentence) transcoders that read anything but the MLP's normalised input or the residual stream
    before its norm, or write anything but the MLP's output."""
    if hook_in not in tuple(normed_inputs) + RESID_MID_HOOKS:
        raise SAEError(f"{what} read {hook_in!r}, but transcoders here must read the MLP's input after its norm "
                       f"({', '.join(normed_inputs)}) or the residual stream before it ({', '.join(RESID_MID_HOOKS)}).")
    if hook_out not in outputs:
        raise SAEError(f"{what} write {hook_out!r}, but they must reconstruct the MLP's output ({', '.join(outputs)}).")


def load_transcoder_set(folder, n_layers: int | None = None, d_model: int | None = None,
                        lazy_decoders: bool = True) -> TranscoderSet:
    """A circuit-tracer transcoder set; refused in one sentence when it does not fit a model of n_layers /
    d_model, misses a layer, or reads from another hook than the MLP's normalised input. With lazy_decoders the
    decoders stay in their files (DecoderRows) and are read row by row when needed. Gemma Scope 2 and SAELens
    folders and circuit-tracer cross-layer transcoders are read by `transcoder_formats` (decoders in memory)."""
    from desktop_app.engine.transcoder_formats import load_other_format

    other = load_other_format(folder, n_layers, d_model)
    if other is not None:
        return other
    folder = Path(folder)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise SAEError(f"{folder} has no config.yaml; choose a circuit-tracer transcoder set folder.")
    if cfg_path.stat().st_size > 1_000_000:
        raise SAEError(f"{cfg_path} is larger than 1 MB, which no transcoder set config is.")
    cfg = parse_flat_yaml(cfg_path.read_text(encoding="utf-8", errors="replace"), str(cfg_path))
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise SAEError(f"{folder} holds a {kind!r}; only per-layer transcoder sets (model_kind: transcoder_set) "
                       "are supported.")
    check_hooks("the transcoders", str(cfg.get("feature_input_hook", "mlp.hook_in")),
                str(cfg.get("feature_output_hook", "mlp.hook_out")), INPUT_HOOKS, OUTPUT_HOOKS)
    activation = cfg.get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        raise SAEError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}.")
    listed = cfg.get("transcoders")
    if isinstance(listed, list) and listed:
        paths = [folder / Path(str(p)).name for p in listed]
    else:
        n_found = len(list(folder.glob("layer_*.safetensors")))
        paths = [folder / f"layer_{i}.safetensors" for i in range(max(n_layers or 0, n_found))]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not paths or missing:
        raise SAEError(f"the transcoder set in {folder} misses layer(s) {missing or [0]}; every layer needs its "
                       "layer_{i}.safetensors.")
    if n_layers is not None and len(paths) != n_layers:
        raise SAEError(f"the transcoder set has {len(paths)} layers but the model has {n_layers}.")
    k = cfg.get("k")
    layers = [_read_layer(p, i, activation, k if isinstance(k, int) else None, lazy_decoders)
              for i, p in enumerate(paths)]
    widths = {tc.d_model for tc in layers}
    if len(widths) != 1 or (d_model is not None and widths != {d_model}):
        raise SAEError(f"the transcoders have d_model {sorted(widths)} but the model's d_model is {d_model}.")
    return TranscoderSet(layers, cfg, folder)


def save_transcoder_set(tset: TranscoderSet, folder, model_name: str = "") -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    activation = tset.layers[0].activation
    lines = [f"model_name: {model_name or 'unknown'}", "model_kind: transcoder_set",
             f"feature_input_hook: {'hook_resid_mid' if reads_resid_mid(tset) else 'mlp.hook_in'}",
             "feature_output_hook: mlp.hook_out", f"activation: {activation}"]
    if activation == "topk":
        lines.append(f"k: {tset.layers[0].k}")
    lines.append("transcoders:")
    for i, tc in enumerate(tset.layers):
        tensors = {"W_enc": tc.W_enc, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if tc.threshold is not None:
            tensors["activation_function.threshold"] = tc.threshold
        if tc.k is not None:
            tensors["k"] = torch.tensor(tc.k)
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
        save_file({n: v.detach().contiguous().cpu() for n, v in tensors.items()}, str(folder / f"layer_{i}.safetensors"))
        lines.append(f"  - layer_{i}.safetensors")
    (folder / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ---- training -------------------------------------------------------------------------------------------------

def mlp_io(lm, ids_batches, cancel: CancelToken | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the MLP's inputs and outputs [tokens, d_model] over batches of token ids [batch, pos]."""
    n_layers = len(lm.adapter.blocks)
    ins: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    outs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    handles = []

    def grab(layer):
        def hook(_mod, args, output):
            ins[layer].append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())
            out = output[0] if isinstance(output, (tuple, list)) else output
            outs[layer].append(out.detach().float().reshape(-1, out.shape[-1]).cpu())
        return hook

    try:
        for L in range(n_layers):
            handles.append(lm.adapter.mlp(L).register_forward_hook(grab(L)))
        with torch.inference_mode():
            for ids in ids_batches:
                if cancel is not None:
                    cancel.check()
                lm.model(input_ids=ids.to(lm.input_device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in ins], [torch.cat(y) for y in outs]


def fit_transcoder(x: torch.Tensor, y: torch.Tensor, d_transcoder: int, k: int, steps: int = 300,
                   lr: float = 3e-3, batch_size: int = 512, seed: int = 0, skip: bool = False) -> Transcoder:
    """A TopK transcoder x -> y by Adam on the MSE with unit-norm decoder rows (as the SAE trainer does)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    w_dec = torch.randn(d_transcoder, d, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    x_scale = float(x.norm(dim=-1).mean().clamp_min(1e-8)) / math.sqrt(d)
    params = {"W_enc": (w_dec.clone() / x_scale).requires_grad_(), "W_dec": (w_dec * y.std()).requires_grad_(),
              "b_enc": torch.zeros(d_transcoder, requires_grad=True), "b_dec": y.mean(0).clone().requires_grad_()}
    if skip:
        params["W_skip"] = torch.zeros(d, d, requires_grad=True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        xb, yb = x[idx], y[idx]
        tc = Transcoder(params["W_enc"], params["W_dec"], params["b_enc"], params["b_dec"], "topk", None, k,
                        params.get("W_skip"))
        loss = (tc(xb) - yb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return Transcoder(params["W_enc"].detach().clone(), params["W_dec"].detach().clone(),
                          params["b_enc"].detach().clone(), params["b_dec"].detach().clone(), "topk", None, k,
                          params["W_skip"].detach().clone() if skip else None)


def fit_transcoders(lm, ids_batches, d_transcoder: int = 128, k: int = 8, steps: int = 300, seed: int = 0,
                    skip: bool = False, cancel: CancelToken | None = None):
    """Job: a TopK transcoder per layer fitted to the model's MLPs on the given token batches; returns a
    TranscoderSet with the explained variance of each layer's output in its config (`explained_variance`)."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    yield Progress(0, len(lm.adapter.blocks) + 1, "reading the MLPs")
    ins, outs = mlp_io(lm, ids_batches, cancel)
    layers, ev = [], []
    for L, (x, y) in enumerate(zip(ins, outs)):
        cancel.check()
        tc = fit_transcoder(x, y, d_transcoder, k, steps=steps, seed=seed + L, skip=skip)
        with torch.no_grad():
            resid = (tc(x) - y).pow(2).sum()
            ev.append(float(1 - resid / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)))
        layers.append(tc)
        yield Progress(L + 1, len(ins) + 1, f"layer {L}: explained variance {ev[-1]:.3f}")
    return TranscoderSet(layers, {"explained_variance": ev, "elapsed_s": time.perf_counter() - t0,
                                  "activation": "topk", "k": k})
