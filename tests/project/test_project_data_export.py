import csv
import errno

import numpy as np
import pytest

from desktop_app.engine.errors import ProjectFileError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import atomic
from desktop_app.project.data_export import export_csv, export_npz

from iwb_testkit import make_result


def test_npz_has_exactly_the_contract_arrays(tmp_path):
    r = make_result(shape=(3, 4))
    r.extras = {}
    path = export_npz(r, tmp_path / "out.npz")
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"values", "tokens_clean", "tokens_corrupted", "clean_metric", "corrupted_metric",
                                "elapsed_s", "labels_layer", "labels_position"}
        np.testing.assert_array_equal(z["values"], r.values)
        np.testing.assert_array_equal(z["tokens_corrupted"], [1, 2, 5, 4])
        assert float(z["clean_metric"]) == 1.5 and np.isnan(z["corrupted_metric"])
        assert float(z["elapsed_s"]) == 0.25
        assert z["labels_layer"].dtype.kind == "U" and list(z["labels_layer"]) == ["0", "1", "2"]
        assert list(z["labels_position"]) == [f"{i}: tok{i} ü" for i in range(4)]


def test_npz_adds_a_kinds_extra_arrays_but_no_traceback(tmp_path):
    r = make_result(shape=(3, 4))
    r.extras = {"sem": np.full((3, 4), 0.5), "traceback": np.array("Traceback ..."), "values": np.zeros(1)}
    with np.load(export_npz(r, tmp_path / "out.npz"), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["sem"], np.full((3, 4), 0.5))
        assert "traceback" not in z.files
        np.testing.assert_array_equal(z["values"], r.values)  # a contract array is never shadowed


def test_npz_labels_missing_dim_are_indices(tmp_path):
    r = AnalysisResult("h", "activation_patching", {}, ["layer", "head"], np.zeros((2, 3)), {"layer": [0, 1]})
    with np.load(export_npz(r, tmp_path / "h.npz"), allow_pickle=False) as z:
        assert list(z["labels_head"]) == ["0", "1", "2"] and z["labels_head"].dtype.kind == "U"


def test_csv_one_row_per_cell(tmp_path):
    r = make_result(shape=(3, 4))
    path = export_csv(r, tmp_path / "out.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "layer_label", "position", "position_label", "value"]
    assert len(rows) == 12
    for row in rows:
        i, j = int(row["layer"]), int(row["position"])
        assert row["position_label"] == r.labels["position"][j] and row["layer_label"] == str(i)
        expected = r.values[i, j]
        if np.isnan(expected):
            assert row["value"] == "nan"
        else:
            assert np.float32(float(row["value"])) == expected


def test_bad_output_folder(tmp_path, monkeypatch):
    r = make_result()
    with pytest.raises(ProjectFileError, match="does not exist"):
        export_csv(r, tmp_path / "missing" / "x.csv")
    with pytest.raises(ProjectFileError, match="does not exist"):
        export_npz(r, tmp_path / "missing" / "x.npz")
    with pytest.raises(ProjectFileError, match="folder"):
        export_csv(r, tmp_path)

    def read_only(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    monkeypatch.setattr(atomic, "_open_tmp", read_only)
    with pytest.raises(ProjectFileError, match="not writable"):
        export_npz(r, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
