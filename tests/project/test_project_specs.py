import json

import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.specs import (ANALYSIS_KINDS, ActivationPatchingSpec, CausalTracingSpec, ModelRef,
                                       Prompts, SAEFeaturesSpec, analysis_from_dict, to_dict)

from iwb_testkit import all_specs


def test_every_kind_is_registered_and_covered():
    from desktop_app.project import kinds

    kinds.load()  # the kinds registered in project/kinds modules (else the set depends on the tests run before)
    assert {"activation_patching", "causal_tracing", "attribution_patching", "ablation",
            "sae_features"} <= set(ANALYSIS_KINDS)
    assert {s.kind for s in all_specs()} == set(ANALYSIS_KINDS)


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.kind)
def test_spec_round_trips_through_json(spec):
    d = json.loads(json.dumps(to_dict(spec)))
    assert d["kind"] == spec.kind and d["name"] == spec.name
    again = analysis_from_dict(d)
    assert again == spec and type(again) is type(spec)


def test_defaults_match_the_contract():
    t = CausalTracingSpec("t", subject="Mary")
    assert (t.noise, t.samples, t.component, t.window) == (3.0, 10, "resid_post", 10)
    a = analysis_from_dict({"name": "r", "kind": "activation_patching"})
    assert (a.component, a.positions, a.direction, a.layers) == ("resid_pre", "each", "denoise", None)


def test_model_and_prompts_round_trip():
    m = ModelRef("/m", dtype="bfloat16", device="cuda:1", trust_remote_code=True, config_hash="ab")
    assert ModelRef.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    p = Prompts("a", "b", " c", " d", prepend_bos=True)
    assert Prompts.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert "prepend_bos" not in Prompts("a").to_dict()


def test_unknown_kind_names_it_and_lists_known():
    with pytest.raises(SpecError) as e:
        analysis_from_dict({"name": "x", "kind": "logit_lens_9000"})
    msg = str(e.value)
    assert "logit_lens_9000" in msg and all(k in msg for k in ANALYSIS_KINDS)


def test_missing_fields_are_named():
    with pytest.raises(SpecError, match="'subject'"):
        analysis_from_dict({"name": "x", "kind": "causal_tracing"})
    with pytest.raises(SpecError, match="'kind'"):
        analysis_from_dict({"name": "x"})
    with pytest.raises(SpecError, match="'name'"):
        analysis_from_dict({"kind": "activation_patching"})
    with pytest.raises(SpecError, match="'sae'"):
        analysis_from_dict({"name": "x", "kind": "sae_features"})
    with pytest.raises(SpecError, match="'path'"):
        ModelRef.from_dict({"dtype": "auto"})


@pytest.mark.parametrize("bad, field", [
    ({"component": "resid_sideways"}, "component"),
    ({"positions": "some"}, "positions"),
    ({"direction": "both"}, "direction"),
    ({"metric": "accuracy"}, "metric"),
    ({"layers": [0, -1]}, "layers"),
    ({"layers": "0,1"}, "layers"),
    ({"layers": []}, "layers"),
    ({"colour": "red"}, "colour"),
])
def test_bad_activation_patching_fields(bad, field):
    with pytest.raises(SpecError, match=f"'{field}'"):
        analysis_from_dict({"name": "x", "kind": "activation_patching", **bad})


def test_bad_values_of_other_kinds():
    with pytest.raises(SpecError, match="'samples'"):
        CausalTracingSpec("t", "Mary", samples=0)
    with pytest.raises(SpecError, match="'samples'"):
        CausalTracingSpec("t", "Mary", samples="10")
    with pytest.raises(SpecError, match="'noise'"):
        CausalTracingSpec("t", "Mary", noise=float("nan"))
    with pytest.raises(SpecError, match="'hook'"):
        SAEFeaturesSpec("s", sae="/x", hook="blocks.0.resid")
    with pytest.raises(SpecError, match="'top_k'"):
        SAEFeaturesSpec("s", sae="/x", top_k=-1)
    with pytest.raises(SpecError, match="'method'"):
        analysis_from_dict({"name": "a", "kind": "ablation", "method": "delete"})
    with pytest.raises(SpecError, match="'device'"):
        ModelRef("/m", device="gpu")
    with pytest.raises(SpecError, match="'dtype'"):
        ModelRef("/m", dtype="int8")
    with pytest.raises(SpecError, match="'name'"):
        ActivationPatchingSpec("  ")
    with pytest.raises(SpecError, match="'prepend_bos'"):
        Prompts("a", prepend_bos="yes")


def test_specs_are_immutable_values():
    s = ActivationPatchingSpec("r", layers=[1, 2])
    assert s.layers == (1, 2)
    with pytest.raises(AttributeError):
        s.metric = "kl_div"
    assert hash(s) == hash(ActivationPatchingSpec("r", layers=(1, 2)))
