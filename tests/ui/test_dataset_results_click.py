"""A click on a cell of a result over a dataset: the first pair's tokens, and no patch for named positions."""
import numpy as np

from desktop_app.engine.results import AnalysisResult
from desktop_app.ui.analysis_controller import AnalysisController, _first_pair, pair_tokens


def test_first_pair_of_padded_tokens():
    assert _first_pair(np.array([[5, 6, 7, -1], [1, 2, 3, 4]])) == [5, 6, 7]
    assert _first_pair(np.array([5, 6])) == [5, 6]


def test_named_positions_give_no_patch():
    def result(positions):
        return AnalysisResult("r", "activation_patching", {"component": "resid_pre", "positions": positions},
                              ["layer", "position"], np.zeros((2, 3)), labels={"layer": ["0", "1"]})
    assert AnalysisController.cell_patch(result("named"), {"layer": 1, "position": 2}) is None
    patch = AnalysisController.cell_patch(result("each"), {"layer": 1, "position": 2})
    assert patch is not None and patch.layer == 1 and patch.position == 2


def test_a_picked_pairs_tokens_without_padding():
    tokens = np.array([[5, 6, 7, -1], [1, 2, 3, 4], [9, -1, -1, -1]])
    assert pair_tokens(tokens, 1) == [1, 2, 3, 4]
    assert pair_tokens(tokens, 2) == [9]
    try:
        pair_tokens(tokens, 3)
    except IndexError as e:
        assert "pair 3" in str(e)
    else:
        raise AssertionError("pair 3 of 3 pairs was accepted")
