"""Transcoder feature cards against brute-force activations: the check shared by per-layer and CLT tests."""
import numpy as np
import pytest


def check_cards_against_brute_force(lm, dash, docs, acts, features, n_top, atol, rtol=1e-7, context=None):
    """Densities, peaks, top contexts and their token windows of `dash` equal the per-document activations `acts`
    (acts[doc][layer][position, feature]) of the token lists `docs`. With `context` (the window's half width) each
    context is also its document's peak and its window's bounds are checked. Returns (features that fired,
    features whose density is strictly between 0 and 1), for the caller's not-vacuous checks."""
    assert [(d.layer, d.feature) for d in dash] == features
    n_tokens = sum(len(d) for d in docs)
    fired_any = partial = 0
    for d in dash:
        per_token = [a[d.layer][:, d.feature] for a in acts]
        fired = sum(int((a > 0).sum()) for a in per_token)
        assert d.n_tokens == n_tokens
        assert d.density == pytest.approx(fired / n_tokens, abs=1e-12)
        fired_any += fired > 0
        partial += 0 < fired < n_tokens
        per_doc = np.array([a.max() for a in per_token])
        assert d.max_activation == pytest.approx(max(per_doc.max(), 0.0), abs=atol)
        expected = sorted(per_doc[per_doc > 0], reverse=True)[:n_top]
        np.testing.assert_allclose([c.activation for c in d.top_contexts], expected, atol=atol, rtol=rtol)
        for c in d.top_contexts:
            a = per_token[c.document]
            assert a[c.position] == pytest.approx(c.activation, abs=atol)
            lo = c.position - c.max_index
            if context is not None:
                assert a.max() == pytest.approx(c.activation, abs=atol)
                assert lo == max(0, c.position - context)
                assert len(c.tokens) == min(len(docs[c.document]), c.position + context + 1) - lo
            assert c.tokens == lm.tokens_of_ids(docs[c.document][lo:lo + len(c.tokens)]).display
            np.testing.assert_allclose(c.activations, np.clip(a[lo:lo + len(c.tokens)], 0, None), atol=atol)
    return fired_any, partial
