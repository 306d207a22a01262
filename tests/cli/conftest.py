"""Fixtures for the command-line tests: experiment files on the trained IOI model."""
import os

import pytest
from cli_helpers import experiment_dict, write_json


@pytest.fixture
def make_experiment(tmp_path, ioi_gpt2_dir):
    """make_experiment(analyses, **prompt changes) -> path of an experiment file whose model path is
    relative to the file (it must resolve against the file, not the working directory)."""
    def make(analyses, name="experiment.json", **prompt_changes):
        folder = tmp_path / "experiments"
        folder.mkdir(exist_ok=True)
        rel = os.path.relpath(ioi_gpt2_dir, folder)
        return write_json(folder / name, experiment_dict(rel, analyses, **prompt_changes))
    return make
