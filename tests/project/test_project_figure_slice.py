"""The registry's figure hook: attention results give a figure one layer's one head (query x key), chosen by
index or by the model's layer number, never a sum; kinds without the hook keep the default."""
import numpy as np
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds

TOKENS = ["0: <bos>", "1: When", "2: ▁Mary", "3: ▁and", "4: ▁John"]


def patterns(seed=0):
    values = np.random.default_rng(seed).random((2, 3, 5, 5))
    return AnalysisResult("attn", "attention_patterns", {"prompt": "clean"}, ["layer", "head", "query", "key"],
                          values, {"layer": ["1", "3"], "head": ["0", "1", "2"], "query": TOKENS, "key": TOKENS})


def rollout():
    values = np.random.default_rng(1).random((4, 5, 5))
    return AnalysisResult("roll", "attention_rollout", {}, ["layer", "query", "key"], values,
                          {"layer": ["0", "1", "2", "3"], "query": TOKENS, "key": TOKENS})


def test_patterns_slice_by_layer_number_and_head():
    r = patterns()
    s = kinds.figure_slice(r, {"layer": "3", "head": "2"})
    np.testing.assert_array_equal(s.values, r.values[1, 2])
    assert s.dims == ["query", "key"] and s.labels == [TOKENS, TOKENS]
    assert s.chosen == {"layer": 1, "head": 2} and s.notes == ["layer 3 of 2", "head 2 of 3"]
    by_index = kinds.figure_slice(r, {"layer": 1, "head": -1})
    np.testing.assert_array_equal(by_index.values, r.values[1, 2])


def test_defaults_first_pattern_and_last_rollout_layer():
    r = patterns()
    np.testing.assert_array_equal(kinds.figure_slice(r).values, r.values[0, 0])
    ro = rollout()
    s = kinds.figure_slice(ro)
    np.testing.assert_array_equal(s.values, ro.values[3])
    assert s.chosen == {"layer": 3}


@pytest.mark.parametrize("selection, message", [
    ({"layer": "2"}, "no layer '2'; choose one of 1, 3"),
    ({"head": 3}, "head index 3 is out of range"),
    ({"position": 0}, "chooses its layer, head, not position"),
])
def test_a_selection_the_result_lacks_is_refused(selection, message):
    with pytest.raises(SpecError, match=message):
        kinds.figure_slice(patterns(), selection)


def test_kinds_without_the_hook_keep_the_default():
    r = AnalysisResult("resid", "activation_patching", {"metric": "logit_diff"}, ["layer", "position"],
                       np.zeros((2, 3)), {})
    assert kinds.figure_slice(r) is None
    with pytest.raises(SpecError, match="has no layer to choose"):
        kinds.figure_slice(r, {"layer": 0})
