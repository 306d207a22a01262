"""Concept activation vectors and TCAV with significance (Kim et al. 2018), the `tcav` kind.

For each layer L and run i, a linear classifier separates the concept's activations from those of a random
set R_i (last token, `hook` of layer L); its unit normal, pointing toward the concept, is the CAV. The TCAV
score of a target token over the input texts is the fraction of inputs whose directional derivative
    S = d target(last position) / d act_L(last position) . CAV
is positive; the target is the logit of a token or a metric expression of the last position's logits (contract
6.2, e.g. "logprob(answer) - logprob(wrong)"). As in the paper, the concept is compared against `runs` random sets drawn (with `seed`) from a
corpus, and the same is done for a random "concept" R_0 against the same sets; a two-sided Student t-test of
the two score samples gives each layer's p-value (Bonferroni over layers optional).

    result.values                    # [layer] mean TCAV score of the concept over the runs
    result.extras["p_value"]         # [layer] two-sided t-test, concept runs vs random runs
    result.extras["significant"]     # [layer] p (Bonferroni-adjusted if asked) < alpha
    result.extras["concept_scores"], ["random_scores"]  # [run, layer] the two distributions
    result.extras["cavs"]            # [run, layer, width] the concept's CAVs
"""
from __future__ import annotations

import time

import numpy as np
import torch

from desktop_app.engine.activations_dataset import (check_layer_kind, collect_pooled, pad_id, padded,
                                                    tokenize_texts)
from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.conformance import require_for_hook
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import EMBED, hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.logistic import fit_logistic
from desktop_app.engine.results import AnalysisResult, empty_values
from desktop_app.engine.stats import ttest_ind
from desktop_app.engine.text_data import read_texts


def _leaf(x: torch.Tensor) -> torch.Tensor:
    # frozen parameters: make the embedding output a leaf so that everything after it carries a graph
    return x.detach().requires_grad_(True)


def target_gradients(lm, docs: list[list[int]], kind: str, target_id, batch_size: int = 16,
                     cancel: CancelToken | None = None):
    """Job: float32 numpy [layer, input, width], the gradient of the target at each input's last position
    with respect to `kind` of every layer at that position (one forward and one backward pass per batch). The
    target is logit(target_id), or a function of the last-position logits [rows, vocab] -> [rows] (a metric
    expression, see `expression_target`)."""
    cancel = cancel or CancelToken()
    require_for_hook(lm, hook_name(0, kind), f"gradients at {kind}", restarts=False)
    names = [hook_name(layer, kind) for layer in range(lm.info.n_layers)]
    out = np.zeros((len(names), len(docs), lm.info.d_model), dtype=np.float32)
    pad = pad_id(lm)
    n_batches = (len(docs) + batch_size - 1) // batch_size
    write = {EMBED: _leaf}
    write.update({n: (lambda a: a) for n in names})  # every read activation on the graph's path
    with torch.inference_mode(False):
        for b in range(n_batches):
            cancel.check()
            yield Progress(b, n_batches, f"gradients of the target: batch {b + 1} of {n_batches}")
            rows = list(range(b * batch_size, min(len(docs), (b + 1) * batch_size)))
            ids, lengths = padded([docs[i] for i in rows], pad)
            with torch.enable_grad(), hooks(lm, read=names, write=write, keep_graph=True, cancel=cancel) as store:
                logits = forward_logits(lm, ids)
                last = (lengths - 1).to(logits.device)
                arange = torch.arange(len(rows), device=logits.device)
                last_logits = logits[arange, last]
                value = (target_id(last_logits) if callable(target_id) else
                         last_logits[:, int(target_id)].float()).sum()
                grads = torch.autograd.grad(value, [store[n] for n in names], allow_unused=True)
            for layer, g in enumerate(grads):
                if g is not None:
                    out[layer, rows] = g[arange, last].detach().float().cpu().numpy()
    return out


def expression_target(lm, expression, answer: str | None = None, wrong: str | None = None):
    """The metric expression (contract 6.2) as a differentiable function of last-position logits [rows, vocab];
    `answer` / `wrong` in it stand for these single tokens."""
    from desktop_app.engine.metric_expr import MetricExpression, TokenSets, parse_metric

    expr = parse_metric(expression)
    if not isinstance(expr, MetricExpression):
        raise SpecError(f"the TCAV target {expression!r} is not a metric expression.")
    bound = expr.bind(lm.single_token_id)
    ids = {}
    for which, text in (("answer", answer), ("wrong", wrong)):
        if expr.uses(which):
            if not text:
                raise SpecError(f"the TCAV target \"{expr.text}\" uses {which}, but the prompts have no "
                                f"{'answer' if which == 'answer' else 'wrong answer'}; type one.")
            ids[which] = lm.single_token_id(text, which)

    def target(last_logits: torch.Tensor) -> torch.Tensor:
        rows = last_logits.shape[0]
        sets = {w: TokenSets.of([i] * rows) for w, i in ids.items()}
        values, zero = bound(last_logits, sets.get("answer"), sets.get("wrong"))
        if bool(zero.any()):
            raise SpecError(f"the TCAV target \"{expr.text}\" divides by zero for {int(zero.sum())} inputs; "
                            "change the expression.")
        return values
    target.text = expr.text
    return target


def draw_random_sets(n_corpus: int, size: int, n_sets: int, seed: int) -> list[np.ndarray]:
    """n_sets index sets of `size` corpus texts: disjoint when the corpus is large enough, else each drawn
    without replacement on its own."""
    rng = np.random.default_rng(seed)
    if n_corpus >= size * n_sets:
        perm = rng.permutation(n_corpus)
        return [np.sort(perm[i * size:(i + 1) * size]) for i in range(n_sets)]
    return [np.sort(rng.choice(n_corpus, size=size, replace=False)) for _ in range(n_sets)]


def cav(concept_acts: np.ndarray, random_acts: np.ndarray, l2: float) -> np.ndarray:
    """Unit normal of a concept-vs-random logistic classifier, pointing toward the concept."""
    x = np.concatenate([random_acts, concept_acts])
    y = np.r_[np.zeros(len(random_acts), dtype=np.int64), np.ones(len(concept_acts), dtype=np.int64)]
    model = fit_logistic(x, y, 2, l2=l2)
    if not model.converged:
        raise SpecError(f"a CAV's classifier did not converge (gradient {model.grad_norm:.2g}); raise l2.")
    return model.direction()


def is_expression(target) -> bool:
    """A TCAV target is a metric expression when given as one, or as a text that calls logit / logprob / prob;
    any other text is a literal token."""
    import re

    from desktop_app.engine.metric_expr import MetricExpression

    if isinstance(target, (dict, MetricExpression)):
        return True
    return isinstance(target, str) and bool(re.search(r"\b(logit|logprob|prob)\s*\(", target))


def tcav_scores(grads: np.ndarray, direction: np.ndarray) -> float:
    """Fraction of inputs (rows of grads [input, width]) with a positive directional derivative."""
    return float(np.mean(grads @ direction > 0))


def tcav_job(lm, concept, random, inputs, target: str, hook: str = "resid_post", runs: int = 10,
             random_size: int | None = None, seed: int = 0, alpha: float = 0.05, bonferroni: bool = False,
             l2: float = 1e-2, batch_size: int = 16, cache_dir=None, cancel: CancelToken | None = None,
             name: str = "tcav", prepend_bos: bool | None = None, answer: str | None = None,
             wrong: str | None = None):
    """Job: the `tcav` analysis. concept / random / inputs: text lists or files; target: one token, or a metric
    expression ({"expression": ...}, a MetricExpression, or a text calling logit / logprob / prob) whose
    `answer` / `wrong` are the given tokens."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    kind = check_layer_kind(lm, hook)
    concept_texts = read_texts(concept, "concept texts")
    corpus = read_texts(random, "random corpus")
    input_texts = read_texts(inputs, "input texts")
    if is_expression(target):
        target_fn = expression_target(lm, target, answer, wrong)
        target, target_id = target_fn.text, -1
    else:
        target_fn = target_id = lm.single_token_id(target, "target")
    runs = int(runs)
    if runs < 2:
        raise SpecError(f"runs must be at least 2 for the t-test, not {runs}.")
    size = int(random_size or len(concept_texts))
    if size < 1 or len(corpus) < size:
        raise SpecError(f"the random corpus has {len(corpus)} texts but each random set needs {size}; "
                        "give a larger corpus or a smaller random_size.")
    sets = draw_random_sets(len(corpus), size, runs + 1, seed)
    used = np.unique(np.concatenate(sets))
    where = {int(c): i for i, c in enumerate(used)}

    concept_acts = yield from collect_pooled(lm, concept_texts, kind, "last", batch_size, cache_dir, cancel,
                                             prepend_bos, what="concept text")
    random_acts = yield from collect_pooled(lm, [corpus[i] for i in used], kind, "last", batch_size, cache_dir,
                                            cancel, prepend_bos, what="random text")
    docs = tokenize_texts(lm, input_texts, prepend_bos, what="input text")
    grads = yield from target_gradients(lm, docs, kind, target_fn, batch_size, cancel)

    n_layers = concept_acts.shape[0]
    concept_scores = np.zeros((runs, n_layers), dtype=np.float32)
    random_scores = np.zeros((runs, n_layers), dtype=np.float32)
    cavs = np.zeros((runs, n_layers, concept_acts.shape[2]), dtype=np.float32)
    values = empty_values((n_layers,))
    p_values = np.ones(n_layers, dtype=np.float64)
    t_stats = np.zeros(n_layers, dtype=np.float64)
    rows = [np.array([where[int(c)] for c in s]) for s in sets]
    for layer in range(n_layers):
        cancel.check()
        yield Progress(layer, n_layers, f"CAVs of layer {layer}")
        base = random_acts[layer][rows[0]]
        for run in range(runs):
            counterpart = random_acts[layer][rows[run + 1]]
            cavs[run, layer] = cav(concept_acts[layer], counterpart, l2)
            concept_scores[run, layer] = tcav_scores(grads[layer], cavs[run, layer])
            random_scores[run, layer] = tcav_scores(grads[layer], cav(base, counterpart, l2))
        values[layer] = concept_scores[:, layer].mean()
        t_stats[layer], p_values[layer] = ttest_ind(concept_scores[:, layer], random_scores[:, layer])
        yield Partial(index=(np.array([layer]),), values=np.array([values[layer]], dtype=np.float32))
    adjusted = np.minimum(1.0, p_values * n_layers) if bonferroni else p_values
    yield Progress(n_layers, n_layers, "done")
    return AnalysisResult(
        name=name, kind="tcav",
        params=dict(hook=kind, target=target, runs=runs, random_size=size, seed=int(seed), alpha=float(alpha),
                    bonferroni=bool(bonferroni), l2=float(l2), n_concept=len(concept_texts),
                    n_inputs=len(input_texts), n_corpus=len(corpus)),
        dims=["layer"], values=values, labels={"layer": [str(i) for i in range(n_layers)]},
        elapsed_s=time.perf_counter() - t0,
        extras={"p_value": p_values.astype(np.float32), "p_value_adjusted": adjusted.astype(np.float32),
                "significant": adjusted < float(alpha), "t_statistic": t_stats.astype(np.float32),
                "concept_scores": concept_scores, "random_scores": random_scores, "cavs": cavs,
                "random_sets": np.stack(sets).astype(np.int64),
                "target_id": np.array(target_id, dtype=np.int64)})
