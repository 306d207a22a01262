"""Jacobian lens: read an early layer's residual through the average Jacobian of the final residual.

lens_L(h) = unembed(final_norm(J_L @ h)), where h is the output of block L (resid_post) and
J_L = E[d h_final / d h_L] over prompts and source positions p >= skip_first, summing the target positions
p' >= p (the final residual at every later position depends on h_L[p]). h_final is the output of the last block,
so J of the last layer is the identity and its lens is the logit lens.

Estimator: for output dimensions i_1..i_B, the prompt is replicated B times and copy b gets the cotangent
e_{i_b} at every position; one backward pass gives, at source position p of copy b, row i_b of
sum_{p' >= p} d h_final[p'] / d h_L[p] for every layer L at once. Per prompt: the rows averaged over the source
positions p >= skip_first; over prompts: the mean of the per-prompt averages (a running mean, so lenses fitted
on separate corpora merge by weighting with n_prompts). One forward and one backward pass per chunk of
dim_batch dimensions: ceil(d_model / dim_batch) per prompt.

File (a torch file, read with weights_only=True): {"J": {layer: [d_model, d_model]}, "n_prompts", "d_model"}
as the J-lens release's files (neuronpedia/jacobian-lens `*_jacobian_lens_n1000.pt`) hold them, as public
scripts that load those files read them (the "J" entry of the loaded dict, layers = sorted keys; float16 matrices there;
the source layers exclude the last one, whose J is the identity). Ours adds "n_layers", "skip_first_n_positions",
"model", "format" and stores float32. J[i, j] = d h_final_i / d h_j (applied as J @ h). The reader also accepts
"jacobians" instead of "J", a stacked [n, d, d] tensor there, or a dict of per-layer [d, d] tensors under
integer keys ("5") or "layer_5" / "layer5" keys; anything else is refused.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.errors import JobCancelled, SpecError
from desktop_app.engine.file_checks import nonfinite_problem
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.results import AnalysisResult

FORMAT = "interp-workbench jacobian lens v1"
SKIP_FIRST_N_POSITIONS = 16
MAX_FILE_BYTES = 16 * 2**30
MATRIX_KEYS = ("J", "jacobians")
_LAYER_KEY = re.compile(r"^(?:layer[_.]?|blocks\.)?(\d+)$", re.IGNORECASE)


@dataclass
class JacobianLens:
    jacobians: dict[int, torch.Tensor]  # layer -> [d_model, d_model], applied as J @ h
    d_model: int
    n_prompts: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def source_layers(self) -> list[int]:
        return sorted(self.jacobians)

    def transform_resid_post(self, layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        """J_layer @ h for every position (None when the lens has no matrix for this layer)."""
        j = self.jacobians.get(layer)
        if j is None:
            return None
        return resid @ j.to(resid.device, resid.dtype).T


def save_jacobian_lens(lens: JacobianLens, path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(lens.meta)
    state.update(format=FORMAT, d_model=int(lens.d_model), n_prompts=int(lens.n_prompts),
                 J={int(L): j.detach().float().cpu().contiguous() for L, j in lens.jacobians.items()})
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _matrices(state, where: str) -> dict[int, torch.Tensor]:
    """The per-layer matrices of a loaded file, under the layouts the module docstring lists."""
    key = next((k for k in MATRIX_KEYS if isinstance(state, dict) and k in state), None)
    if key is not None:
        inner = state[key]
        if isinstance(inner, torch.Tensor) and inner.dim() == 3:
            layers = state.get("source_layers") or list(range(inner.shape[0]))
            if len(layers) != inner.shape[0]:
                raise SpecError(f"{where} has {inner.shape[0]} stacked matrices but {len(layers)} source layers.")
            return {int(L): inner[i] for i, L in enumerate(layers)}
        state = inner
    if not isinstance(state, dict):
        raise SpecError(f"{where} holds a {type(state).__name__}, not a dict of per-layer Jacobian matrices.")
    found = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(str(key))
        if m and isinstance(value, torch.Tensor) and value.dim() == 2:
            found[int(m.group(1))] = value
    if not found:
        keys = ", ".join(repr(k) for k in list(state)[:8])
        raise SpecError(f"{where} holds no per-layer [d_model, d_model] matrices (keys found: {keys or 'none'}); "
                        "it is not a Jacobian lens file.")
    return found


def load_jacobian_lens(path, lm) -> JacobianLens:
    p = Path(str(path or "")).expanduser()
    if not p.is_file():
        raise SpecError(f"{p} is not a file; choose the Jacobian lens .pt file.")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SpecError(f"{p} is larger than {MAX_FILE_BYTES >> 30} GiB; it is not a Jacobian lens for this app.")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickled objects and corrupt files get the same sentence
        raise SpecError(f"{p} could not be read as plain tensors ({type(err).__name__}); it may be corrupt or hold "
                        "pickled objects, which are never loaded.", str(err)) from err
    matrices = _matrices(state, str(p))
    d, n = lm.info.d_model, lm.info.n_layers
    meta = {k: v for k, v in state.items() if k not in MATRIX_KEYS and isinstance(v, (int, float, str))} \
        if isinstance(state, dict) else {}
    widths = sorted({tuple(j.shape) for j in matrices.values()})
    file_layers = meta.get("n_layers")
    if widths != [(d, d)] or meta.get("d_model", d) != d or max(matrices) >= n \
            or (isinstance(file_layers, int) and file_layers != n):
        file_d = meta.get("d_model", widths[0][0])
        file_n = file_layers if isinstance(file_layers, int) else f"at least {max(matrices) + 1}"
        raise SpecError(f"the Jacobian lens in {p} is for d_model {file_d} and {file_n} layers, but the loaded "
                        f"model has d_model {d} and {n} layers; choose the lens fitted for this model.")
    problem = nonfinite_problem({f"J of layer {L}": j for L, j in matrices.items()})
    if problem:
        raise SpecError(f"the Jacobian lens in {p} {problem}; it would turn those rows into NaN, so fit it again.")
    n_prompts = meta.get("n_prompts", 0)
    return JacobianLens({L: j.float() for L, j in matrices.items()}, d,
                        int(n_prompts) if isinstance(n_prompts, int) else 0, meta)


def prompt_jacobians(lm, ids: list[int], skip_first: int = SKIP_FIRST_N_POSITIONS, dim_batch: int = 64,
                     cancel: CancelToken | None = None) -> dict[int, torch.Tensor]:
    """{layer: [d, d] float64} for one prompt: row i of sum_{p' >= p} d h_final[p'] / d h_layer[p], averaged over
    the source positions p >= skip_first."""
    from desktop_app.engine.capture import forward_logits, hooks

    n, d, n_pos = lm.info.n_layers, lm.info.d_model, len(ids)
    if n_pos <= skip_first:
        raise SpecError(f"a prompt of {n_pos} tokens has no position past the first {skip_first} that are skipped.")
    names = [hook_name(L, "resid_post") for L in range(n)]
    rows = {L: torch.zeros(d, d, dtype=torch.float64) for L in range(n)}
    for start in range(0, d, int(dim_batch)):
        if cancel is not None:
            cancel.check()
        dims = torch.arange(start, min(start + int(dim_batch), d))
        batch = torch.tensor([ids] * len(dims), device=lm.input_device)
        # the model's weights are frozen: block 0's output becomes the leaf the graph grows from
        leaf = {names[0]: lambda act: act.detach().requires_grad_(True)}
        with torch.enable_grad(), hooks(lm, read=names, write=leaf, keep_graph=True) as store:
            forward_logits(lm, batch, last_only=True)
            final = store[names[-1]]
            cot = torch.zeros_like(final)
            cot[torch.arange(len(dims)), :, dims.to(cot.device)] = 1.0
            grads = torch.autograd.grad(final, [store[name] for name in names], cot, allow_unused=True)
        for L, g in enumerate(grads):
            if g is not None:  # unused: the layer does not reach the final residual (cannot happen in a stack)
                rows[L][dims] = g[:, skip_first:].double().mean(1).cpu()
    return rows


def fit_jacobian_lens_job(lm, corpus, out_path, n_prompts: int = 100, context: int = 64,
                          skip_first: int = SKIP_FIRST_N_POSITIONS, dim_batch: int = 64,
                          name: str = "jacobian_lens_fitting", cancel: CancelToken | None = None):
    """Fit J for every layer on up to n_prompts texts of `corpus` (a text file or a list of texts), cut to
    `context` tokens; texts not longer than skip_first tokens are left out. Saves the lens (also the partial
    average of the prompts finished when cancelled). Result: [layer] the mean |J - I| entry, extras
    `prompt_tokens` [prompt]."""
    from desktop_app.engine.sae.corpus import read_corpus

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if lm.info.dtype not in ("float32", "float64"):
        raise SpecError(f"fitting a Jacobian lens needs the model in float32 (it is {lm.info.dtype}); reload it "
                        "with dtype float32.")
    texts = read_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    docs = []
    for text in texts:
        ids = lm.tokenize(text, what="corpus text").ids[:int(context)]
        if len(ids) > skip_first:
            docs.append(ids)
        if len(docs) >= int(n_prompts):
            break
    if not docs:
        raise SpecError(f"the corpus has no text longer than {skip_first} tokens (the skipped first positions); "
                        "add longer texts or lower skip_first.")
    n, d = lm.info.n_layers, lm.info.d_model
    mean = {L: torch.zeros(d, d, dtype=torch.float64) for L in range(n)}
    done, status, message = 0, "complete", ""
    passes = -(-d // int(dim_batch))
    lm.model.eval()
    for k, ids in enumerate(docs):
        try:
            rows = prompt_jacobians(lm, ids, skip_first, dim_batch, cancel)
        except JobCancelled:
            status = "partial"
            message = f"cancelled after {done} of {len(docs)} prompts; the average over those is saved."
            break
        done += 1
        for L in range(n):
            mean[L] += (rows[L] - mean[L]) / done
        yield Progress(done, len(docs), f"Jacobian lens: prompt {done} of {len(docs)} ({passes} backward passes each)")
    if done == 0:
        status, message = "failed", "cancelled before the first prompt finished; no lens was saved."
    else:
        meta = dict(n_layers=n, skip_first_n_positions=int(skip_first), model=str(lm.path))
        save_jacobian_lens(JacobianLens({L: m.float() for L, m in mean.items()}, d, done, meta), out_path)
    eye = torch.eye(d, dtype=torch.float64)
    values = np.array([float((mean[L] - eye).abs().mean()) if done else np.nan for L in range(n)], dtype=np.float32)
    return AnalysisResult(name=name, kind="jacobian_lens_fitting",
                          params=dict(n_prompts=int(n_prompts), context=int(context), skip_first=int(skip_first),
                                      dim_batch=int(dim_batch), out=str(out_path)),
                          dims=["layer"], values=values, labels={"layer": [str(L) for L in range(n)]},
                          status=status, message=message, elapsed_s=time.perf_counter() - t0,
                          extras={"prompt_tokens": np.array([len(x) for x in docs[:done]], dtype=np.int64)})
