"""Attribution graphs: a prompt's circuit through per-layer transcoders (circuit tracing), offline."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.graph_ranking import ranked_figure
from desktop_app.project.kinds import AnalysisKind, ExportFormat, register_kind
from desktop_app.project.kinds._reading import prompt_field, tokens_of, with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class AttributionGraphSpec(AnalysisSpec):
    transcoders: str = param("", widget="path",
                             tip="Per-layer transcoders: a circuit-tracer set (config.yaml + layer_{i}.safetensors), "
                                 "Gemma Scope 2 transcoder folders (config.json + params.safetensors) or SAELens "
                                 "transcoder folders (cfg.json + sae_weights.safetensors), one layer's folder or the "
                                 "folder above per-layer ones")
    prompt: str = prompt_field()
    max_feature_nodes: int = param(7500, widget="int", minimum=1, maximum=1_000_000,
                                   tip="At most this many active features become nodes (the most influential on the "
                                       "logits; the rest count as part of their error node)")
    node_threshold: float = param(0.8, widget="float", minimum=0.0, maximum=1.0,
                                  tip="Keep the fewest features that carry this fraction of the influence on the logits")
    edge_threshold: float = param(0.98, widget="float", minimum=0.0, maximum=1.0,
                                  tip="Keep the fewest edges that carry this fraction of the edge influence")
    max_n_logits: int = param(10, widget="int", minimum=1, maximum=100,
                              tip="At most this many of the top next-token logits become nodes")
    desired_logit_prob: float = param(0.95, widget="float", minimum=0.0, maximum=1.0,
                                      tip="Take top logits until their probabilities add up to this")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.attribution_graph import attribution_graph_job

    return with_spec_params(attribution_graph_job(
        lm, tokens_of(lm, prompts, spec), spec.transcoders, max_feature_nodes=spec.max_feature_nodes,
        node_threshold=spec.node_threshold, edge_threshold=spec.edge_threshold, max_n_logits=spec.max_n_logits,
        desired_logit_prob=spec.desired_logit_prob, name=spec.name, prompt_label=spec.prompt, cancel=cancel), spec)


def _write_json(result, path):
    from desktop_app.project.graph_json import write_graph_json

    return write_graph_json(result, path)


register_kind(AnalysisKind(
    kind="attribution_graph", label="Attribution graph", short="graph", spec=AttributionGraphSpec, job=_job,
    dims="[node]", value_name="influence on the logits", scale="sequential", view="graph", click="describe",
    figure_slice=ranked_figure,
    exports=(ExportFormat("json", _write_json, "Neuronpedia / circuit-tracer graph JSON"),),
    description="Trace the prompt's top logits back through transcoder features, error nodes and token "
                "embeddings by direct effects in the replacement model; pruned by influence."))
