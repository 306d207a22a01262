"""SAE features: the activations [position, feature] of a sparse autoencoder reading one hook point."""
from __future__ import annotations

from desktop_app.project import dataset_jobs
from desktop_app.project.kinds import AnalysisKind, prompt_text, register_kind
from desktop_app.project.specs import SAEFeaturesSpec


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.sae.jobs import sae_features_job

    return sae_features_job(lm, sae_path=spec.sae, hook=spec.hook, top_k=spec.top_k, name=spec.name, cancel=cancel,
                            prompt_label=spec.prompt, text=prompt_text(prompts, spec.prompt),
                            prepend_bos=prompts.prepend_bos, force_hook=spec.force_hook)


def _name(values: dict) -> str:
    return f"sae {values.get('hook') or 'features'}"


register_kind(AnalysisKind(
    kind="sae_features", label="SAE features", short="sae", name_for=_name, spec=SAEFeaturesSpec, job=_job,
    dims="[position, feature]", value_name="feature activation", scale="sequential", view="feature_table",
    click="select_token", dataset_job=dataset_jobs.sae_features,
    description="Encode one prompt's activations at a hook point with an SAE; the strongest features per token."))
