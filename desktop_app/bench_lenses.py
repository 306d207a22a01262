"""Wall times of the single-prompt analyses (lenses, attention, direct logit attribution, token attribution)
for `interp-workbench bench`, each also as a multiple of one plain forward pass of the same prompt."""
from __future__ import annotations

import time


def _cases(lm, pair):
    from desktop_app.engine.attention_views import attention_patterns_job, attention_rollout_job
    from desktop_app.engine.dla import direct_logit_attribution_job
    from desktop_app.engine.lenses import logit_lens_job
    from desktop_app.engine.token_attribution import token_attribution_job

    t, a, w = pair.clean, pair.answer_id, pair.wrong_id
    yield "logit lens [layer, pos]", lambda: logit_lens_job(lm, t, "answer", a)
    yield "attention patterns (all heads)", lambda: attention_patterns_job(lm, t)
    yield "attention rollout", lambda: attention_rollout_job(lm, t)
    yield "direct logit attribution (heads)", lambda: direct_logit_attribution_job(lm, t, a, w)
    yield "integrated gradients, 50 steps", lambda: token_attribution_job(lm, t, a, w, "integrated_gradients",
                                                                          baseline="zero", steps=50)
    yield "occlusion (window 1)", lambda: token_attribution_job(lm, t, a, w, "occlusion", baseline="zero")
    yield "SHAP (256 samples)", lambda: token_attribution_job(lm, t, a, w, "shap", baseline="zero", samples=256)
    yield "LIME (256 samples)", lambda: token_attribution_job(lm, t, a, w, "lime", baseline="zero", samples=256)
    if len(t.ids) * (lm.info.n_layers + 1) <= 400:
        yield "attention flow (exact)", lambda: attention_rollout_job(lm, t, method="flow")


def analysis_times(lm, pair, forward_s: float):
    """[(title, seconds, seconds / one forward pass)], each analysis run once after a warm-up of the model."""
    from desktop_app.engine.jobs import drive

    rows = []
    for title, make in _cases(lm, pair):
        t0 = time.perf_counter()
        result = drive(make())
        seconds = time.perf_counter() - t0
        if result.status != "complete":
            title += f" ({result.status})"
        rows.append((title, seconds, seconds / forward_s if forward_s > 0 else float("nan")))
    return rows
