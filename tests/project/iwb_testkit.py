"""Shared builders for the project-layer tests (a uniquely named module, imported by the tests)."""
import numpy as np

from desktop_app.engine.results import AnalysisResult
from desktop_app.project.document import Project
from desktop_app.project.specs import (AblationSpec, ActivationPatchingSpec, AttributionPatchingSpec,
                                       CausalTracingSpec, ModelRef, Prompts, SAEFeaturesSpec)


def all_specs():
    """One spec of every kind, with non-default values wherever a field allows it."""
    return [
        ActivationPatchingSpec("resid", component="head_out", positions="all", direction="noise",
                               metric="kl_div", layers=[0, 2]),
        CausalTracingSpec("trace", subject="Mary", noise=2.5, samples=3, component="mlp_out", window=4, seed=7),
        AttributionPatchingSpec("attr", component="attn_out", positions="each", direction="noise",
                                metric="answer_prob"),
        AblationSpec("abl", component="blocks.1.attn.hook_z", method="resample", positions="each",
                     metric="logit_diff_recovered", layers=[1], noise=0.5, seed=3),
        SAEFeaturesSpec("sae", sae="/saes/res_0", hook="blocks.0.hook_resid_post", prompt="corrupted", top_k=0),
    ] + reading_specs() + _concept_specs() + sae_workflow_specs()


def reading_specs():
    """The lens, attention, direct-logit-attribution and token-attribution kinds (registered in project.kinds)."""
    from desktop_app.project import kinds

    kinds.load()  # first, so that the built-in kinds keep their places (the panel's order is registration order)
    from desktop_app.project.kinds.attention import AttentionPatternsSpec, AttentionRolloutSpec
    from desktop_app.project.kinds.attribution_graph import AttributionGraphSpec
    from desktop_app.project.kinds.direct_logit_attribution import DirectLogitAttributionSpec
    from desktop_app.project.kinds.logit_lens import LogitLensSpec
    from desktop_app.project.kinds.token_attribution import TokenAttributionSpec
    from desktop_app.project.kinds.tuned_lens_training import TunedLensTrainingSpec
    from desktop_app.project.kinds.jacobian_lens_fitting import JacobianLensFittingSpec

    return [
        LogitLensSpec("lens", lens="tuned", lens_path="/lenses/gpt2", prompt="corrupted", target=" Paris", k=7),
        AttentionPatternsSpec("att", prompt="Some literal text", layers=[0, 1], heads=[3]),
        AttentionRolloutSpec("roll", residual=0.25, head_fusion="max", method="flow"),
        DirectLogitAttributionSpec("dla", prompt="corrupted", granularity="layers"),
        TokenAttributionSpec("tok", method="lime", target="answer_prob", baseline=" the", steps=7,
                             integration="riemann_left", samples=99, window=3, seed=5),
        TunedLensTrainingSpec("tl", corpus="/data/corpus.txt", out="/lenses/out", steps=9, context=16, batch_size=2,
                              lr=0.01, seed=1),
        JacobianLensFittingSpec("jl", corpus="/data/corpus.txt", out="/lenses/j.pt", n_prompts=7, context=48,
                                skip_first=4, dim_batch=16),
        LogitLensSpec("jlens", lens="jacobian", lens_path="/lenses/j.pt", target="prediction"),
        AttributionGraphSpec("graph", transcoders="/transcoders/gpt2", prompt="corrupted", max_feature_nodes=500,
                             node_threshold=0.6, edge_threshold=0.9, max_n_logits=3, desired_logit_prob=0.5),
    ]


def sae_workflow_specs():
    from desktop_app.project import kinds

    kinds.load()  # built-in kinds first: importing a kind module directly would register it ahead of them
    from desktop_app.project.kinds.sae_workflows import (SAEDashboardsSpec, SAEEditSpec, SAEMetricsSpec,
                                                         SAETrainingSpec)
    from desktop_app.project.kinds.transcoder_training import TranscoderTrainingSpec
    return [
        SAETrainingSpec("train", hook="blocks.1.hook_mlp_out", corpus="/c.txt", out="/saes/new", architecture="jumprelu",
                        width=64, k=4, l1=1.0, l0=0.5, tokens=5000, context=32, steps=10, batch_size=64, lr=1e-2,
                        lr_warmup_steps=2, checkpoint_every=5, resume=True, cache=False, seed=3),
        SAEDashboardsSpec("dash", sae="/saes/res_0", corpus="/c.txt", hook="blocks.0.hook_resid_post",
                          features=[1, 5], top_n=3, n_top=4, window=2, context=64, tokens=100, force_hook=True),
        SAEEditSpec("edit", sae="/saes/res_0", edits=[{"feature": 2, "op": "steer", "value": -1.5,
                                                       "positions": [0, 3]}],
                    prompt="corrupted", hook="blocks.0.hook_resid_post", keep_error=False, n_continue=4, top_n=3,
                    force_hook=True),
        SAEMetricsSpec("metrics", sae="/saes/res_0", corpus="/c.jsonl", hook="blocks.0.hook_resid_post",
                       max_texts=7, force_hook=True),
        TranscoderTrainingSpec("tc", corpus="/c.txt", out="/tc/new", architecture="jumprelu", width=48, k=4, l0=0.3,
                               skip=True, layers=[0, 1], tokens=5000, context=32, steps=10, batch_size=64, lr=1e-2,
                               buffer_tokens=2048, seed=3),
    ]


def _concept_specs():
    from desktop_app.project.kinds.probe import ProbeSpec
    from desktop_app.project.kinds.steering import SteeringSpec, SteeringVectorSpec
    from desktop_app.project.kinds.tcav import TCAVSpec

    return [ProbeSpec("probe", dataset="/data/labels.csv", hook="resid_pre", position="mean", test_fraction=0.5,
                      seed=2, l2=0.5),
            TCAVSpec("tcav", concept=["a cat", "a dog"], random="/data/corpus.txt", inputs=["x"], target=" Mary",
                     hook="mlp_out", runs=4, random_size=2, seed=1, alpha=0.01, bonferroni=True),
            SteeringVectorSpec("sv", positive=["good"], negative=["bad"], method="pca", hook="resid_pre",
                               position="mean"),
            SteeringSpec("steer", vector="/cv.gguf", coefficient=-2.0, layers=[1], prompt="corrupted", n_continue=5)]


def make_result(name="resid", kind="activation_patching", shape=(3, 4), status="partial", seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    values.flat[-1] = np.nan
    dims = ["layer", "position", "head"][: len(shape)]
    labels = {"layer": list(range(shape[0]))}
    if len(shape) > 1:
        labels["position"] = [f"{i}: tok{i} ü" for i in range(shape[1])]
    return AnalysisResult(name=name, kind=kind, params={"component": "resid_pre", "layers": [0, 1]},
                          dims=dims, values=values, labels=labels, status=status, message="stopped early",
                          tokens_clean=np.array([1, 2, 3, 4]), tokens_corrupted=np.array([1, 2, 5, 4]),
                          clean_metric=1.5, corrupted_metric=float("nan"), elapsed_s=0.25,
                          extras={"baseline": np.linspace(0, 1, 5), "names": np.array(["a", "bé"])})


def make_project():
    p = Project(model=ModelRef("/models/tiny", dtype="float32", device="cpu", config_hash="deadbeef"),
                prompts=Prompts("When Mary and John", "When John and Mary", " Mary", " John", prepend_bos=False))
    for spec in all_specs():
        p.add_analysis(spec)
    p.set_result("resid", make_result())
    p.set_result("trace", make_result("trace", "causal_tracing", shape=(2,), status="complete", seed=1))
    p.set_view("open_panes", ["heatmap", "sae"])
    p.set_view("selected_hooks", ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"])
    p.set_view("colour_range", {"resid": [-1.0, 1.0]})
    return p


def assert_results_equal(a, b):
    assert (a.name, a.kind, a.params, list(a.dims), a.labels, a.status, a.message) == \
           (b.name, b.kind, b.params, list(b.dims), b.labels, b.status, b.message)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.values.dtype == b.values.dtype
    np.testing.assert_array_equal(a.tokens_clean, b.tokens_clean)
    np.testing.assert_array_equal(a.tokens_corrupted, b.tokens_corrupted)
    np.testing.assert_equal([a.clean_metric, a.corrupted_metric, a.elapsed_s],
                            [b.clean_metric, b.corrupted_metric, b.elapsed_s])
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        np.testing.assert_array_equal(a.extras[k], b.extras[k])


def assert_projects_equal(a, b):
    assert a.model == b.model
    assert a.prompts == b.prompts
    assert a.view_state == b.view_state
    assert [e.spec for e in a.analyses] == [e.spec for e in b.analyses]
    assert [e.result_spec for e in a.analyses] == [e.result_spec for e in b.analyses]
    for ea, eb in zip(a.analyses, b.analyses):
        assert (ea.result is None) == (eb.result is None)
        if ea.result is not None:
            assert_results_equal(ea.result, eb.result)
