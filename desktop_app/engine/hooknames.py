"""TransformerLens-style hook point names. The only place where these strings are built or parsed."""
from __future__ import annotations

import re

# Per-block hook kinds, in the order they are met in a forward pass.
BLOCK_KINDS = ("resid_pre", "attn.hook_z", "attn.hook_pattern", "attn_out", "resid_mid", "mlp_out", "resid_post")
SHORT_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out")
EMBED = "hook_embed"
FINAL_NORM = "ln_final.hook_normalized"

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_name(layer: int, kind: str) -> str:
    """hook_name(3, "resid_pre") -> "blocks.3.hook_resid_pre"; hook_name(3, "attn.hook_z") -> "blocks.3.attn.hook_z".
    The short component "head_out" maps to hook_z, the activation it patches."""
    if kind == "head_out":
        kind = "attn.hook_z"
    if kind.startswith("attn."):
        return f"blocks.{layer}.{kind}"
    if kind.startswith("hook_"):
        kind = kind[len("hook_"):]
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}")
    return f"blocks.{layer}.hook_{kind}"


def parse_hook_name(name: str) -> tuple[int | None, str]:
    """"blocks.3.hook_resid_pre" -> (3, "resid_pre"); "blocks.3.attn.hook_z" -> (3, "attn.hook_z");
    "hook_embed" -> (None, "hook_embed"). Raises ValueError for a name that is not a hook point."""
    m = _BLOCK_RE.match(name.strip())
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest.startswith("attn."):
            kind = rest
        elif rest.startswith("hook_"):
            kind = rest[len("hook_"):]
        else:
            kind = rest
        if kind not in BLOCK_KINDS:
            raise ValueError(f"{name!r} is not a hook point name (e.g. blocks.0.hook_resid_pre)")
        return layer, kind
    if name in (EMBED, FINAL_NORM):
        return None, name
    raise ValueError(f"{name!r} is not a hook point name (e.g. blocks.0.hook_resid_pre)")
