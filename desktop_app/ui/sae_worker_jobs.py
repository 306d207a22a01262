"""SAE jobs the window hands to the runner, as `fn(state, cancel)` closures (see worker_jobs.py).

The SAE itself never leaves the runner thread: every job reads it through the engine's small cache
(engine.sae.jobs.cached_load_sae, keyed by path, modification time and hook), so the UI passes only the
path and the hook point it was attached to.
"""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.ui.worker_jobs import _need_model


@dataclass
class SAEAttached:
    path: str
    hook: str
    d_in: int
    d_sae: int
    architecture: str
    trained_on: str  # the hook the SAE's file names ("" when none)
    force_hook: bool = False  # applied although its file names another hook or model (the user forced it)

    def summary(self) -> str:
        return f"{self.architecture} SAE, {self.d_sae} features, reading {self.hook}"


def _loaded(lm, path: str, hook: str, force_hook: bool = False):
    """The SAE at `path` checked against `hook` of the loaded model through engine/hook_trust.py: an SAE whose
    file names another hook or model is refused in one sentence naming both, unless force_hook; the width is
    checked too (SAEError / SpecError)."""
    from desktop_app.engine.sae.jobs import cached_load_sae, trusted_sae

    lm.hook_point(hook)  # an unknown hook point -> SpecError
    sae = cached_load_sae(path, hook)
    trusted_sae(lm, sae, hook, force_hook)
    return sae


def attach_sae(path: str, hook: str, force_hook: bool = False):
    def job(state, cancel):
        sae = _loaded(_need_model(state), path, hook, force_hook)
        return SAEAttached(path=str(path), hook=hook, d_in=int(sae.d_in), d_sae=int(sae.d_sae),
                           architecture=str(sae.cfg.architecture), trained_on=str(sae.cfg.hook_name or ""),
                           force_hook=bool(force_hook))
    return job
