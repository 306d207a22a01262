"""The jobs the window hands to the runner, as `fn(state, cancel)` closures.

They run in the runner thread: engine modules (and with them torch) are imported inside the functions, never
when this module is imported. What they return to the UI is plain data (strings, lists, numpy arrays,
AnalysisResult), never the model itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.engine.errors import ModelLoadError


@dataclass
class ModelLoaded:
    path: str
    summary: str
    info: dict
    tree: list  # [(node label, [(group label, [(hook name, kind, shape text)])])]
    config_hash: str
    device: str
    memory_bytes: int
    conformance: dict | None = None  # engine.conformance.Conformance.to_dict()
    conformance_text: str = ""  # one line for the Model pane; the failed checks in its tooltip


def _freeze_long_lived_objects():
    """torch, transformers and the model are hundreds of thousands of long-lived objects: a full garbage
    collection walks them all and holds the GIL for a few hundred ms, freezing the window mid-sweep. Moving
    what exists now out of the collector's reach (gc.freeze) makes later collections short."""
    import gc

    gc.collect()
    gc.freeze()


@dataclass
class ModelDropped:
    """The previously loaded model was let go (the new model's weights are about to be read)."""


WEIGHTS_START = 10  # load_model_job's progress when the files and the configuration have been checked


def _drop_old_at_weights(events, state):
    """Pass the loading job's events on; the old model is let go only when the new one's weights start to load,
    so a bad path, a fake .gguf or a missing extra leaves the loaded model as it was, and both models never sit
    in memory together."""
    from desktop_app.engine.jobs import Progress

    try:
        event = next(events)
        while True:
            if isinstance(event, Progress) and event.done >= WEIGHTS_START and state.lm is not None:
                state.lm = None
                _free_memory()
                yield ModelDropped()
            yield event
            event = next(events)
    except StopIteration as stop:
        return stop.value


def load_model(path: str, dtype: str, device: str, trust_remote_code: bool, quantize: str = "none"):
    def job(state, cancel):
        from desktop_app.engine.loading import load_model_job

        lm = yield from _drop_old_at_weights(load_model_job(path, dtype, device, trust_remote_code, cancel, quantize), state)
        state.lm = lm
        _freeze_long_lived_objects()
        tree = [(node, [(group, [(p.name, p.kind, p.shape_text()) for p in points]) for group, points in groups])
                for node, groups in lm.hook_tree()]
        conf = lm.conformance
        return ModelLoaded(path=str(lm.path), summary=lm.info.summary(), info=lm.info.to_dict(), tree=tree,
                           config_hash=lm.config_hash, device=lm.info.device, memory_bytes=lm.info.memory_bytes,
                           conformance=conf.to_dict() if conf else None,
                           conformance_text="\n".join([conf.summary()] + [f"{c.name}: {c.describe()}" for c in
                                                                           conf.failed()]) if conf else "")
    return job


def unload_model():
    def job(state, cancel):
        state.lm = None
        _free_memory()
        return None
    return job


def _free_memory():
    import gc

    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _need_model(state):
    if state.lm is None:
        raise ModelLoadError("no model is loaded; choose a model folder and click Load.")
    return state.lm


@dataclass
class Tokenized:
    """Tokens of each prompt field: display strings, or an error sentence, per field name."""
    tokens: dict  # field -> list of display strings
    errors: dict  # field -> message


def tokenize(texts: dict, prepend_bos=None):
    """texts: {"clean": ..., "corrupted": ..., "answer": ..., "wrong_answer": ...}."""
    def job(state, cancel):
        lm = state.lm
        if lm is None:
            return None
        tokens, errors = {}, {}
        for field, text in texts.items():
            if not text:
                continue
            try:
                if field in ("answer", "wrong_answer"):
                    tokens[field] = lm.token_pieces(text).display
                else:
                    tokens[field] = lm.tokenize(text, prepend_bos, what=field.replace("_", " ")).display
            except Exception as err:  # noqa: BLE001 - shown next to the field, never fatal
                errors[field] = str(err)
        return Tokenized(tokens, errors)
    return job


@dataclass
class Skeleton:
    """The empty result (NaN cells, dims and labels) a streaming analysis is about to fill."""
    result: object


def _skeleton(lm, prompts, spec):
    """The empty result of a kind that streams cells (its registry record's skeleton), else None."""
    from desktop_app.project import kinds

    record = kinds.get(spec.kind)
    return record.skeleton(lm, prompts, spec) if record.skeleton is not None else None


def run_analysis(prompts, spec, batch_size: int | None = None):
    """Run one analysis spec (project.specs) on the loaded model with `prompts` (project.specs.Prompts)."""
    def job(state, cancel):
        lm = _need_model(state)
        from desktop_app.project.dataset_prompts import is_dataset

        # over a dataset the result's shape is not the first pair's (named positions; pairs of other lengths)
        skeleton = None if is_dataset(prompts) else _skeleton(lm, prompts, spec)
        if skeleton is not None:
            yield Skeleton(skeleton)
        from desktop_app.project.execute import analysis_job

        return (yield from analysis_job(lm, prompts, spec, cancel, batch_size=batch_size or None))
    return job


@dataclass
class CellPatch:
    """One heatmap cell as an activation patch: `component` of `layer` (at `position` / `head`, None = all)
    copied from the source run into the target run (denoise: clean into corrupted; noise: the reverse)."""
    component: str
    layer: int
    position: int | None = None
    head: int | None = None
    direction: str = "denoise"

    def describe(self) -> str:
        where = f"{self.component} of layer {self.layer}"
        if self.head is not None:
            where += f", head {self.head}"
        where += ", all positions" if self.position is None else f", position {self.position}"
        source, target = ("clean", "corrupted") if self.direction == "denoise" else ("corrupted", "clean")
        return f"{where} patched from the {source} run into the {target} run"


@dataclass
class Predictions:
    """Top next-token predictions at the last position, per run: [(token display, probability)]."""
    rows: dict
    title: str = ""


def top_predictions(prompts, k: int = 5, patch: CellPatch | None = None, ids: dict | None = None):
    """Top-k next tokens of the clean and corrupted runs and, with `patch`, of the run with that one cell
    patched. `ids` ({"clean": [...], "corrupted": [...]}) are the token ids of the result the cell belongs to;
    without them the prompts are tokenized."""
    def job(state, cancel):
        import torch

        from desktop_app.engine.capture import as_ids, forward_logits, hooks, run_with_cache
        from desktop_app.engine.errors import PromptError
        from desktop_app.engine.hooknames import hook_name

        lm = _need_model(state)
        runs = {}
        for what, text in (("clean", prompts.clean), ("corrupted", prompts.corrupted)):
            given = (ids or {}).get(what)
            if given is not None and len(given):
                runs[what] = as_ids([int(i) for i in given])
            elif text:
                runs[what] = as_ids(lm.tokenize(text, prompts.prepend_bos, what=f"{what} prompt").ids)

        def top(logits):
            probs = torch.softmax(logits[0, -1].float(), -1)
            best = torch.topk(probs, min(k, probs.shape[-1]))
            shown = lm.tokens_of_ids(best.indices.tolist()).display
            return list(zip(shown, [float(p) for p in best.values]))

        rows = {}
        for what, run_ids in runs.items():
            rows[what] = top(forward_logits(lm, run_ids))
            cancel.check()
        if patch is not None:
            source, target = ("clean", "corrupted") if patch.direction == "denoise" else ("corrupted", "clean")
            if source not in runs or target not in runs:
                raise PromptError("the patched run needs both the clean and the corrupted prompt; type both.")
            if runs[source].shape != runs[target].shape:
                raise PromptError("the clean and corrupted prompts differ in length; patching needs equal lengths.")
            hook = hook_name(patch.layer, patch.component)
            _, cache = run_with_cache(lm, runs[source], [hook], cancel=cancel)
            src = cache[hook]
            pos = slice(None) if patch.position is None else patch.position

            def write(act):
                act = act.clone()
                value = src.to(act.device, act.dtype)
                if patch.head is None:
                    act[:, pos] = value[:, pos]
                else:
                    act[:, pos, patch.head] = value[:, pos, patch.head]
                return act

            with hooks(lm, write={hook: write}, cancel=cancel):
                rows["patched"] = top(forward_logits(lm, runs[target]))
        return Predictions(rows, patch.describe() if patch is not None else "")
    return job
