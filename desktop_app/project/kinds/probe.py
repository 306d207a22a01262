"""Linear probes: held-out accuracy per layer of a logistic-regression probe on a labelled text dataset."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, field_values, register_kind
from desktop_app.project.specs import AnalysisSpec, param

# the hook kinds that pool to one vector per text (engine.activations_dataset.LAYER_KINDS; torch stays out)
LAYER_HOOKS = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out")
HOOK_TIP = "Which activation of every layer is read"
POSITION_TIP = "last: the last token's activation; mean: the mean over the text's tokens"


def with_spec_params(job, spec):
    """Pass a job's events on and record the spec's fields in its result's params (what `info` shows); where
    the engine resolved a field (target "answer" -> the token, random_size 0 -> the set size), its value wins."""
    result = yield from job
    result.params = {**field_values(spec), **result.params}
    return result


@dataclass(frozen=True)
class ProbeSpec(AnalysisSpec):
    dataset: str = param(widget="path", tip="A .csv (header text,label) or .jsonl file of labelled texts, 2+ classes")
    hook: str = param("resid_post", widget="choice", choices=LAYER_HOOKS, tip=HOOK_TIP)
    position: str = param("last", widget="choice", choices=("last", "mean"), tip=POSITION_TIP)
    test_fraction: float = param(0.25, widget="float", minimum=0.01, maximum=0.99, step=0.05,
                                 tip="The share of each class held out to measure accuracy")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of the train/test split and the "
                                                                          "control task's shuffled labels")
    l2: float = param(0.01, widget="float", minimum=1e-6, maximum=100.0, step=0.01,
                      tip="L2 penalty on the standardised probe weights")


def _layer(result, coords) -> int | None:
    layer = coords.get("layer")
    return layer if layer is not None and 0 <= layer < len(result.values) else None


def probe_details(result, coords: dict) -> str:
    """The clicked layer's accuracy, control accuracy and confusion matrix (rows: true class)."""
    import numpy as np

    layer, x = _layer(result, coords), result.extras
    if layer is None or "confusion" not in x:
        return "this result stores no confusion matrices."
    classes = [str(c) for c in np.asarray(x.get("classes", []))]
    conf = np.asarray(x["confusion"])[layer]
    classes = classes if len(classes) == conf.shape[0] else [str(i) for i in range(conf.shape[0])]
    lines = [f"accuracy {float(result.values[layer]):.3f}, control {float(x['control_accuracy'][layer]):.3f}, "
             f"selectivity {float(x['selectivity'][layer]):.3f}"
             + (f", majority class {float(x['majority_accuracy']):.3f}" if "majority_accuracy" in x else ""),
             f"confusion on {int(conf.sum())} test texts (rows: true, columns: predicted)"]
    width = max([len(c) for c in classes] + [len(str(int(conf.max())))]) + 2
    lines.append(" " * width + "".join(c[:width - 1].rjust(width) for c in classes))
    for c, row in zip(classes, conf):
        lines.append(c[:width - 1].ljust(width) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.activations_dataset import default_cache_dir
    from desktop_app.engine.probes import probe_job

    job = probe_job(lm, spec.dataset, hook=spec.hook, position=spec.position, test_fraction=spec.test_fraction,
                    seed=spec.seed, l2=spec.l2, batch_size=batch_size or 16, cache_dir=default_cache_dir(),
                    cancel=cancel, name=spec.name, prepend_bos=prompts.prepend_bos)
    return with_spec_params(job, spec)


register_kind(AnalysisKind(
    kind="probe", label="Linear probe", short="probe", spec=ProbeSpec, job=_job, dims="[layer]",
    value_name="held-out accuracy", scale="sequential", view="bars", click="details", details=probe_details,
    name_for=lambda values: f"{values.get('hook') or 'resid_post'} probe",
    description="A logistic-regression probe per layer on a labelled dataset: held-out accuracy, a shuffled-label "
                "control task (selectivity), confusion matrices and the probe directions."))
