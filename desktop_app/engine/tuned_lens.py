"""Tuned lens (Belrose et al. 2023) in the tuned-lens package's folder format: load, save, train on CPU.

A folder holds `config.json` (`d_model`, `num_hidden_layers`, `bias`, `base_model_name_or_path`, `lens_type`
"linear_tuned_lens", ...) and `params.pt`, the state dict of the translators: `{i}.weight` [d_model, d_model]
and `{i}.bias` [d_model] for i = 0 .. num_hidden_layers - 1. Translator i reads the hidden state that enters
block i (output_hidden_states[i]: the embeddings for i = 0, else resid_post of block i - 1) and maps it to
h + W h + b, which goes through the final norm and the unembedding; the last block's output needs none.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.bounded_io import json_error_text, loads_json, read_regular_bytes
from desktop_app.engine.errors import SpecError
from desktop_app.engine.file_checks import CONFIG_MAX_BYTES, nonfinite_problem
from desktop_app.engine.hook_trust import check_model
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.results import AnalysisResult

CONFIG = "config.json"
PARAMS = "params.pt"
MAX_PARAMS_BYTES = 8 * 2**30


@dataclass
class TunedLens:
    weights: torch.Tensor  # [n_layers, d_model, d_model] (nn.Linear layout: out x in)
    biases: torch.Tensor  # [n_layers, d_model]
    config: dict

    @property
    def n_layers(self) -> int:
        return self.weights.shape[0]

    def transform_resid_post(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """The residual stream after block `layer`, translated for the unembedding (identity after the last)."""
        index = layer + 1
        if index >= self.n_layers:
            return resid
        w = self.weights[index].to(resid.device, resid.dtype)
        b = self.biases[index].to(resid.device, resid.dtype)
        return resid + resid @ w.T + b


def load_tuned_lens(path, lm, force_hook: bool = False) -> TunedLens:
    """The tuned lens in `path` for `lm`; refused (one sentence naming both models) when its config names
    another base model, unless force_hook."""
    folder = Path(str(path or "")).expanduser()
    if not (folder / CONFIG).is_file() or not (folder / PARAMS).is_file():
        raise SpecError(f"{folder} is not a tuned-lens folder (it needs {CONFIG} and {PARAMS}); choose the folder "
                        "the tuned-lens package or the workbench saved.")
    try:
        config = loads_json(read_regular_bytes(folder / CONFIG, CONFIG_MAX_BYTES))
    except (OSError, ValueError) as err:  # ValueError: JSON, UTF-8 and the bounded reader's limits
        raise SpecError(f"{folder / CONFIG} {json_error_text(err)}; restore the original file.") from err
    if not isinstance(config, dict):
        raise SpecError(f"{folder / CONFIG} is not a tuned-lens configuration (a JSON object).")
    d, n = lm.info.d_model, lm.info.n_layers
    if config.get("d_model") != d or config.get("num_hidden_layers") != n:
        raise SpecError(f"the tuned lens in {folder} is for d_model {config.get('d_model')} and "
                        f"{config.get('num_hidden_layers')} layers, but the loaded model has d_model {d} and {n} layers; "
                        "choose the lens trained for this model.")
    stated = config.get("base_model_name_or_path")
    check_model("tuned lens", folder, stated if isinstance(stated, str) else None, lm, force_hook=force_hook)
    if (folder / PARAMS).stat().st_size > MAX_PARAMS_BYTES:
        raise SpecError(f"{folder / PARAMS} is larger than {MAX_PARAMS_BYTES >> 30} GiB; it is not a tuned lens.")
    try:
        state = torch.load(folder / PARAMS, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise SpecError(f"{folder / PARAMS} could not be read as tensors ({type(err).__name__}); it may be corrupt "
                        "or not a tuned lens.", str(err)) from err
    if not isinstance(state, dict):
        raise SpecError(f"{folder / PARAMS} does not hold a state dict of translators.")
    weights, biases = [], []
    for i in range(n):
        w = state.get(f"{i}.weight")
        b = state.get(f"{i}.bias", torch.zeros(d))
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (d, d) or not isinstance(b, torch.Tensor) \
                or tuple(b.shape) != (d,):
            raise SpecError(f"{folder / PARAMS} lacks translator {i} of shape [{d}, {d}] (has keys "
                            f"{sorted(state)[:4]}...); it does not fit this model.")
        weights.append(w.float())
        biases.append(b.float())
    problem = nonfinite_problem({f"{i}.weight": w for i, w in enumerate(weights)}
                                | {f"{i}.bias": b for i, b in enumerate(biases)})
    if problem:
        raise SpecError(f"{folder / PARAMS} {problem}; it would turn every reading into NaN, so restore the file.")
    return TunedLens(torch.stack(weights), torch.stack(biases), config)


def save_tuned_lens(lens: TunedLens, folder) -> Path:
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for i in range(lens.n_layers):
        state[f"{i}.weight"] = lens.weights[i].detach().cpu().contiguous()
        state[f"{i}.bias"] = lens.biases[i].detach().cpu().contiguous()
    tmp = folder / (PARAMS + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / PARAMS)
    (folder / CONFIG).write_text(json.dumps(lens.config, indent=1), encoding="utf-8")
    return folder


def _hidden_states(lm, ids: torch.Tensor):
    """(inputs of every block [n_layers, batch, pos, d], final logits [batch, pos, vocab]) of one batch."""
    from desktop_app.engine.capture import forward_logits, hooks

    names = [hook_name(L, "resid_pre") for L in range(lm.info.n_layers)]
    with torch.inference_mode(), hooks(lm, read=names) as store:
        logits = forward_logits(lm, ids)
    return torch.stack([store[n].float() for n in names]), logits.float()


def train_tuned_lens_job(lm, corpus, out_folder, steps: int = 200, context: int = 64, batch_size: int = 8,
                         lr: float = 1e-3, seed: int = 0, name: str = "tuned_lens_training",
                         cancel: CancelToken | None = None):
    """Fit translators (Adam) to minimise KL(model's final distribution || lens distribution), summed over the
    layers, on `corpus` (a text file or a list of texts); saves the folder. Returns a result with the loss
    per step ([step]) and the final per-layer KL in extras."""
    from desktop_app.engine.sae.corpus import read_corpus

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    texts = read_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    docs = []
    for text in texts:
        ids = lm.tokenize(text, what="corpus text").ids[:context]
        if len(ids) >= 2:
            docs.append(ids)
    if not docs:
        raise SpecError("the corpus has no text of two tokens or more; add some sentences.")
    n, d = lm.info.n_layers, lm.info.d_model
    gen = torch.Generator().manual_seed(int(seed))
    weights = torch.zeros(n, d, d, requires_grad=True)
    biases = torch.zeros(n, d, requires_grad=True)
    opt = torch.optim.Adam([weights, biases], lr=lr)
    losses = np.full(int(steps), np.nan, dtype=np.float32)
    per_layer = np.zeros(n, dtype=np.float32)
    status, message = "complete", ""
    for step in range(int(steps)):
        if cancel.cancelled:  # keep the translators trained so far
            status, message = "partial", f"cancelled after {step} of {int(steps)} steps; the lens so far is saved."
            break
        pick = torch.randint(len(docs), (min(batch_size, len(docs)),), generator=gen).tolist()
        length = min(len(docs[i]) for i in pick)
        ids = torch.tensor([docs[i][:length] for i in pick])
        hidden, logits = _hidden_states(lm, ids)
        target = torch.log_softmax(logits, -1)
        with torch.enable_grad():
            kls = []
            for L in range(n):  # translator L reads the input of block L, i.e. resid_post of block L - 1
                h = hidden[L]
                t = h + h @ weights[L].T + biases[L]
                pred = torch.log_softmax(lm.adapter.logits_from_resid(t).float(), -1)
                kls.append((target.exp() * (target - pred)).sum(-1).mean())
            loss = torch.stack(kls).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[step] = float(loss.detach())
        per_layer = np.array([float(k.detach()) for k in kls], dtype=np.float32)
        if step % 10 == 0 or step == steps - 1:
            yield Progress(step + 1, int(steps), f"tuned lens: step {step + 1}, loss {losses[step]:.4f}")
    config = dict(base_model_name_or_path=lm.path, d_model=d, num_hidden_layers=n, bias=True,
                  base_model_revision=None, unembed_hash=None, lens_type="linear_tuned_lens")
    lens = TunedLens(weights.detach(), biases.detach(), config)
    save_tuned_lens(lens, out_folder)
    return AnalysisResult(name=name, kind="tuned_lens_training", params=dict(steps=int(steps), context=int(context),
                          batch_size=int(batch_size), lr=float(lr), seed=int(seed), out=str(out_folder)),
                          dims=["step"], values=losses, labels={"step": [str(i) for i in range(int(steps))]},
                          status=status, message=message, elapsed_s=time.perf_counter() - t0,
                          extras={"kl_per_layer": per_layer})
