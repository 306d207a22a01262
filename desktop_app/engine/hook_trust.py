"""Hook trust: a dictionary (SAE, transcoder, lens) is applied only where its own file says it belongs.

    hook = trusted_hook("SAE", "sae/cfg.json", stated_hook="blocks.1.hook_resid_post", hook=requested,
                        stated_model="gpt2", stated_fingerprint=None, lm=lm, force_hook=False)

A width that matches is not evidence: every resid hook of a model has the same width, so an SAE trained on
layer 3 reads layer 5 without a shape error and returns meaningless features. When the file names a hook
(or a model) and the caller applies it elsewhere, the call is refused in one sentence that names both;
`force_hook=True` applies it anyway (the caller records that it did).

Model identity: a fingerprint written by this program's trainer (`model_fingerprint`, the loaded model's
config hash) is compared exactly; otherwise a stated model name is compared with the loaded model's folder
name and its config's `_name_or_path`, case-blind and ignoring an organisation prefix and punctuation.
"""
from __future__ import annotations

import os
import re

from desktop_app.engine.errors import SAEError

FORCE_HINT = 'set "force_hook": true to apply it anyway'


def _norm_hook(name: str | None) -> str:
    return (name or "").strip()


def _norm_model(name: str | None) -> str:
    last = str(name or "").strip().rstrip("/\\").replace("\\", "/").split("/")[-1]
    return re.sub(r"[^a-z0-9]", "", last.lower())


def loaded_model_names(lm) -> list[str]:
    """The names the loaded model goes by: its folder (or GGUF file stem) and its config's _name_or_path."""
    names = []
    path = str(getattr(lm, "path", "") or "")
    if path and not path.startswith("<"):
        base = os.path.basename(path.rstrip("/\\"))
        names.append(base.rsplit(".", 1)[0] if base.lower().endswith(".gguf") else base)
    config = getattr(getattr(lm, "model", None), "config", None)
    name_or_path = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if name_or_path:
        names.append(str(name_or_path))
    return [n for n in names if _norm_model(n)]


def check_model(what: str, source, stated_model: str | None, lm, *, stated_fingerprint: str | None = None,
                force_hook: bool = False) -> None:
    """Refuse applying `what` (read from `source`) to `lm` when its file names another model."""
    if force_hook or lm is None:
        return
    fingerprint = str(getattr(lm, "config_hash", "") or "")
    if stated_fingerprint and fingerprint:
        if str(stated_fingerprint) == fingerprint:
            return
        raise SAEError(f"The {what} {source} was trained on model {stated_model or '?'} (config hash "
                       f"{stated_fingerprint}) but the loaded model has config hash {fingerprint}; load the "
                       f"model it was trained on, or {FORCE_HINT}.")
    if not stated_model:
        return
    names = loaded_model_names(lm)
    if not names or _norm_model(stated_model) in {_norm_model(n) for n in names}:
        return
    raise SAEError(f"The {what} {source} was trained on model {stated_model} but the loaded model is "
                   f"{names[0]}; load {stated_model}, or {FORCE_HINT} if it is the same model under another name.")


def trusted_hook(what: str, source, stated_hook: str | None, hook: str | None, *, stated_model: str | None = None,
                 stated_fingerprint: str | None = None, lm=None, force_hook: bool = False) -> str:
    """The hook to apply `what` at: the caller's (`hook`) or, when none is given, the one its file names.
    Raises SAEError (one sentence naming both) when they differ, or when the file names another model,
    unless force_hook."""
    stated, asked = _norm_hook(stated_hook), _norm_hook(hook)
    if not stated and not asked:
        raise SAEError(f"The {what} {source} does not say which hook point it reads; give one, e.g. \"hook\": "
                       "\"blocks.6.hook_resid_post\".")
    if stated and asked and stated != asked and not force_hook:
        raise SAEError(f"The {what} {source} was trained on {stated} but is applied to {asked}; apply it at "
                       f"{stated} or choose one trained on {asked}, or {FORCE_HINT}.")
    check_model(what, source, stated_model, lm, stated_fingerprint=stated_fingerprint, force_hook=force_hook)
    return asked or stated
