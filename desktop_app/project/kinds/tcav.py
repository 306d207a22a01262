"""TCAV: how much a concept (its activation vector) drives a target token, per layer, with a t-test."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.engine.errors import SpecError
from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import looks_like_expression, normalise_target, target_to_json
from desktop_app.project.kinds.probe import HOOK_TIP, LAYER_HOOKS, with_spec_params
from desktop_app.project.specs import AnalysisSpec, param

_FILE_TIP = " (one per line, or the path of one .txt / .jsonl / .csv file)"


def as_text_list(spec, names) -> None:
    """A text-list field given as one string (a file path in an experiment file) becomes a one-entry list."""
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, str):
            object.__setattr__(spec, name, (value,))


@dataclass(frozen=True)
class TCAVSpec(AnalysisSpec):
    concept: tuple[str, ...] = param(widget="text_list", path=True, tip="Examples of the concept" + _FILE_TIP)
    random: tuple[str, ...] = param(widget="text_list", path=True, tip="A corpus the random sets are drawn from" + _FILE_TIP)
    inputs: tuple[str, ...] = param((), widget="text_list", path=True,
                                    tip="Texts whose prediction is explained (empty: the clean prompt)" + _FILE_TIP)
    target: str = param("answer", widget="choice", choices=("answer",), editable=True,
                        tip="What is explained: answer (the logit of the prompts' answer), a literal token, or a "
                            "metric expression such as logprob(answer) - logprob(wrong)")
    hook: str = param("resid_post", widget="choice", choices=LAYER_HOOKS, tip=HOOK_TIP)
    runs: int = param(10, widget="int", minimum=2, maximum=500, tip="Random sets the concept is compared against")
    random_size: int = param(0, widget="int", minimum=0, maximum=100_000,
                             tip="Texts per random set (0: as many as the concept examples)")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of the random sets")
    alpha: float = param(0.05, widget="float", minimum=1e-6, maximum=0.5, step=0.01,
                         tip="Significance level of the two-sided t-test")
    bonferroni: bool = param(False, widget="bool", tip="Multiply the p-values by the number of layers")

    def validate(self, where: str) -> None:
        as_text_list(self, ("concept", "random", "inputs"))
        normalise_target(self, where, ("answer",), literal_tokens=True)
        super().validate(where)

    def to_dict(self):
        return target_to_json(super().to_dict(), ("answer",), literal_tokens=True)


def tcav_details(result, coords: dict) -> str:
    """The clicked layer's p-value and the two score distributions (concept runs vs random runs)."""
    import numpy as np

    layer, x = coords.get("layer"), result.extras
    if layer is None or "concept_scores" not in x:
        return "this result stores no score distributions."
    concept, random = np.asarray(x["concept_scores"])[:, layer], np.asarray(x["random_scores"])[:, layer]
    p, adjusted = float(x["p_value"][layer]), float(x["p_value_adjusted"][layer])
    alpha = float((result.params or {}).get("alpha", 0.05))
    verdict = "significant" if bool(x["significant"][layer]) else "not significant"
    bonf = f", Bonferroni-adjusted {adjusted:.3g}" if (result.params or {}).get("bonferroni") else ""
    lines = [f"TCAV score {float(result.values[layer]):.3f}; p = {p:.3g}{bonf}: {verdict} at {alpha:g}"]
    for what, scores in (("concept", concept), ("random", random)):
        lines.append(f"{what:8s} mean {scores.mean():.3f} sd {scores.std(ddof=1) if len(scores) > 1 else 0.0:.3f}: "
                     + " ".join(f"{s:.2f}" for s in np.sort(scores)))
    return "\n".join(lines)


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.activations_dataset import default_cache_dir
    from desktop_app.engine.tcav import tcav_job
    from desktop_app.engine.text_data import texts_or_file

    target = prompts.answer if spec.target == "answer" else spec.target
    expression = looks_like_expression(spec.target)
    if not target:
        raise SpecError("TCAV's target is the answer but the prompts have no answer; type one or give a token.")
    inputs = texts_or_file(spec.inputs, "input texts") if spec.inputs else [prompts.clean]
    job = tcav_job(lm, texts_or_file(spec.concept, "concept texts"), texts_or_file(spec.random, "random corpus"),
                   inputs, target, hook=spec.hook, runs=spec.runs, random_size=spec.random_size or None,
                   seed=spec.seed, alpha=spec.alpha, bonferroni=spec.bonferroni, batch_size=batch_size or 16,
                   cache_dir=default_cache_dir(), cancel=cancel, name=spec.name, prepend_bos=prompts.prepend_bos,
                   answer=prompts.answer if expression else None, wrong=prompts.wrong_answer if expression else None)
    return with_spec_params(job, spec)


register_kind(AnalysisKind(
    kind="tcav", label="TCAV (concept)", short="tcav", spec=TCAVSpec, job=_job, dims="[layer]",
    value_name="TCAV score", scale="sequential", view="bars", click="details", details=tcav_details,
    description="Concept activation vectors per layer and the fraction of inputs whose target grows along them, "
                "tested against random concepts (Kim et al. 2018)."))
