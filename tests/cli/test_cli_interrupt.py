"""Ctrl-C during `interp-workbench run`: exit 130 and a project that keeps the finished cells (status partial)."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_helpers import REPO_ROOT, experiment_dict, write_json

from desktop_app.project.iwb import load_project

# A longer prompt pair (one name differs) so that the head_out sweep has many cells.
LONG_CLEAN = ("When Mary and John went to the store, John gave a drink to Mary. Then Anna and Tom went to "
              "the park and Tom gave a ball to")
LONG_CORRUPTED = LONG_CLEAN[::-1].replace(" moT", " annA", 1)[::-1]


@pytest.fixture(scope="module")
def sweep_model(tmp_path_factory, ioi_tokenizer):
    """A random GPT-2 with 6 layers and 8 heads: slow enough, at one cell per forward pass, to interrupt."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from desktop_app import demo_task

    torch.manual_seed(0)
    config = GPT2Config(n_positions=256, n_embd=128, n_layer=6, n_head=8, vocab_size=ioi_tokenizer.get_vocab_size(),
                        bos_token_id=0, eos_token_id=0, initializer_range=0.1, attn_implementation="eager")
    folder = tmp_path_factory.mktemp("sweep_model") / "gpt2-6l"
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    demo_task.save_hf_tokenizer(ioi_tokenizer, folder)
    return folder


def _start_run(tmp_path, model_folder, analyses):
    """`interp-workbench run` of `analyses` on the long prompt pair, one row per forward pass, its stderr piped."""
    exp = write_json(tmp_path / "exp.json", experiment_dict(model_folder, analyses, clean=LONG_CLEAN,
                                                            corrupted=LONG_CORRUPTED, answer=" Anna",
                                                            wrong_answer=" Tom"))
    out = tmp_path / "p.iwb"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "desktop_app", "run", str(exp), "--out", str(out),
                             "--batch-size", "1"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    return proc, out


def test_ctrl_c_saves_a_partial_project_and_exits_130(tmp_path, sweep_model):
    assert LONG_CORRUPTED != LONG_CLEAN and LONG_CORRUPTED.endswith("Anna gave a ball to")
    analyses = [{"name": "heads", "kind": "activation_patching", "component": "head_out", "positions": "each"},
                {"name": "never", "kind": "activation_patching", "component": "resid_pre"}]
    proc, out = _start_run(tmp_path, sweep_model, analyses)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            seen.append(line)
            m = re.search(r"\| (\d+)/(\d+) cells", line)
            if m and seen and "heads" in "".join(seen) and int(m.group(1)) > 0:
                assert int(m.group(1)) < int(m.group(2)), "the sweep finished before it could be interrupted"
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(seen)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    project = load_project(out)
    r = project.entry("heads").result
    assert r.status == "partial" and "cancelled" in r.message
    finite = np.isfinite(r.values)
    assert finite.any() and not finite.all()
    assert r.dims == ["layer", "position", "head"] and r.values.shape[2] == 8
    assert project.entry("never").result is None  # analyses after the interrupted one are not run


def test_a_second_and_third_ctrl_c_still_save_what_was_finished(tmp_path, sweep_model):
    """The first Ctrl-C asks the sweep to stop; an impatient second one stops at once; a third arriving while
    the project is being saved waits for the save. The analysis that had finished is in the file."""
    analyses = [{"name": "quick", "kind": "activation_patching", "component": "resid_pre", "positions": "all"},
                {"name": "heads", "kind": "activation_patching", "component": "head_out", "positions": "each"}]
    proc, out = _start_run(tmp_path, sweep_model, analyses)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            seen.append(line)
            if "heads" in "".join(seen) and re.search(r"\| [1-9]\d*/\d+ cells", line):
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGINT)  # at once: lands while the sweep is still stopping
                time.sleep(0.2)
                proc.send_signal(signal.SIGINT)  # lands during the save or the exit
                break
            assert time.monotonic() < deadline, "".join(seen)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert code == 130, stderr
    assert "Traceback" not in stderr
    project = load_project(out)
    quick = project.entry("quick").result
    assert quick.status == "complete" and np.isfinite(quick.values).all()
    heads = project.entry("heads").result  # stopped at once (not saved) or stopped after its batch (partial)
    assert heads is None or heads.status in ("partial", "cancelled")
