"""Steering vectors: a direction per layer from contrastive texts (exported as a llama.cpp control vector), and
steering with such a direction (before / after next-token distributions and continuations)."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, ExportFormat, prompt_text, register_kind
from desktop_app.project.kinds.probe import HOOK_TIP, LAYER_HOOKS, POSITION_TIP, with_spec_params
from desktop_app.project.kinds.tcav import as_text_list
from desktop_app.project.specs import AnalysisSpec, param

_LIST_TIP = " (one per line, or the path of one .txt / .jsonl / .csv file)"


@dataclass(frozen=True)
class SteeringVectorSpec(AnalysisSpec):
    positive: tuple[str, ...] = param((), widget="text_list", path=True, tip="Texts showing the behaviour" + _LIST_TIP)
    negative: tuple[str, ...] = param((), widget="text_list", path=True, tip="Texts showing its opposite" + _LIST_TIP)
    pairs: str = param("", widget="path", empty_ok=True,
                       tip="Instead of the lists: a .csv / .jsonl of contrastive pairs (columns positive,negative)")
    method: str = param("mean_diff", widget="choice", choices=("mean_diff", "pca"),
                        tip="mean_diff: mean(positive) - mean(negative); pca: first component of the pair differences")
    hook: str = param("resid_post", widget="choice", choices=LAYER_HOOKS, tip=HOOK_TIP)
    position: str = param("last", widget="choice", choices=("last", "mean"), tip=POSITION_TIP)

    def validate(self, where: str) -> None:
        as_text_list(self, ("positive", "negative"))
        super().validate(where)


def _vector_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.activations_dataset import default_cache_dir
    from desktop_app.engine.steering import steering_vector_job
    from desktop_app.engine.text_data import texts_or_file

    if spec.pairs:
        sources = dict(pairs=spec.pairs)
    else:
        sources = dict(positive=texts_or_file(spec.positive, "positive texts"),
                       negative=texts_or_file(spec.negative, "negative texts"))
    job = steering_vector_job(lm, **sources, method=spec.method, hook=spec.hook, position=spec.position,
                              batch_size=batch_size or 16, cache_dir=default_cache_dir(), cancel=cancel,
                              name=spec.name, prepend_bos=prompts.prepend_bos)
    return with_spec_params(job, spec)


def _write_gguf(result, path):
    from desktop_app.engine.control_vector import export_result_gguf

    return export_result_gguf(result, path)[0]


def _write_safetensors(result, path):
    from desktop_app.engine.control_vector import export_result_safetensors

    return export_result_safetensors(result, path)


register_kind(AnalysisKind(
    kind="steering_vector", label="Steering vector", short="steering vector", spec=SteeringVectorSpec,
    job=_vector_job, dims="[layer, d_model]", value_name="direction", scale="diverging", view="heatmap",
    click="describe",
    exports=(ExportFormat("gguf", _write_gguf, "a llama.cpp control vector (--control-vector)"),
             ExportFormat("safetensors", _write_safetensors, "the directions, one tensor per hook point")),
    description="Directions per layer from positive vs negative texts (mean difference or PCA), as repeng and "
                "steering-vectors compute them."))


@dataclass(frozen=True)
class SteeringSpec(AnalysisSpec):
    vector: str = param(widget="path", tip="A llama.cpp control vector (.gguf) or exported directions (.safetensors)")
    coefficient: float = param(4.0, widget="float", minimum=-1000.0, maximum=1000.0, step=0.5,
                               tip="The multiple of each direction added to the activation at every position")
    layers: tuple[int, ...] | None = param(None, widget="layers", tip="Layers to steer, e.g. 3, 4 (empty: every "
                                                                       "layer the file has a direction for)")
    prompt: str = param("clean", widget="choice", choices=("clean", "corrupted"), editable=True,
                        tip="clean, corrupted, or a literal text")
    n_continue: int = param(20, widget="int", minimum=0, maximum=512, tip="Greedy tokens generated before / after")


def steering_details(result, coords: dict) -> str:
    """The top next tokens before / after steering, the KL and the two greedy continuations."""
    import numpy as np

    x = result.extras
    if "top_tokens" not in x:
        return "this result stores no token lists."
    tokens, probs = np.asarray(x["top_tokens"]), np.asarray(result.values)
    lines = [f"KL(before || after) = {float(x['kl']):.4g}", f"{'before':>24s}   {'after':>24s}"]
    for (tb, pb), (ta, pa) in zip(zip(tokens[0], probs[0]), zip(tokens[1], probs[1])):
        lines.append(f"{str(tb)[:16]:>16s} {float(pb):7.3f}   {str(ta)[:16]:>16s} {float(pa):7.3f}")
    cont = [str(c) for c in np.asarray(x.get("continuation", np.array(["", ""])))]
    lines += ["continuation before: " + cont[0], "continuation after:  " + cont[1]]
    return "\n".join(lines)


def _steer_job(lm, prompts, spec, cancel, batch_size):
    import numpy as np

    from desktop_app.engine.control_vector import directions_file_for
    from desktop_app.engine.steering import steering_intervention_job

    directions, kind = directions_file_for(lm, spec.vector)
    layers = spec.layers if spec.layers is not None else [
        int(i) for i in np.flatnonzero(np.abs(directions).sum(1) > 0)]
    job = steering_intervention_job(lm, prompt_text(prompts, spec.prompt), directions, kind, spec.coefficient,
                                    layers, spec.n_continue, cancel=cancel, name=spec.name)
    return with_spec_params(job, spec)


register_kind(AnalysisKind(
    kind="steering", label="Steering (apply a vector)", short="steering", spec=SteeringSpec, job=_steer_job,
    dims="[which, rank]", value_name="probability", scale="sequential", view="heatmap", click="details",
    details=steering_details,
    name_for=lambda values: f"steering x{values.get('coefficient', '')}",
    description="Add a steering direction (a control vector or exported directions) and compare the next-token "
                "distribution and greedy continuations before and after."))
