"""A loaded model: the HF module, its tokenizer, its shape facts, its hook points and its tokenisation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, asdict

import torch

from desktop_app.engine.adapters import Adapter
from desktop_app.engine.errors import PromptError
from desktop_app.engine.hooknames import EMBED, FINAL_NORM, hook_name

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(text: str, what: str) -> None:
    """A lone surrogate (a broken \\ud800 escape in a JSON file) is not text a tokenizer can read."""
    m = _LONE_SURROGATE.search(text) if isinstance(text, str) else None
    if m:
        raise PromptError(f"the {what} holds U+{ord(m.group()):04X} at character {m.start()}, half of a broken "
                          f"character pair that is not valid text; remove it or retype the {what}.")

POS = -1  # stands for the sequence length in a hook point's shape


@dataclass
class ModelInfo:
    architecture: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    dtype: str
    device: str
    n_params: int
    memory_bytes: int
    parallel_attn_mlp: bool = False
    quantize: str = "none"  # int8 / int4, or a checkpoint's own quantisation "... (as stored)"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gqa = f" ({self.n_kv_heads} kv)" if self.n_kv_heads != self.n_heads else ""
        return (f"{self.architecture}: {self.n_layers} layers, {self.n_heads} heads{gqa}, d_model {self.d_model}, "
                f"{human_count(self.n_params)} parameters, {human_bytes(self.memory_bytes)}, {self.dtype}"
                + (f" {self.quantize}" if self.quantize != "none" else "") + f" on {self.device}")


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]  # POS (-1) for the sequence dimension, batch left out
    group: str  # "embed", "attention", "mlp", "residual", "final"

    def shape_text(self) -> str:
        return "[" + ", ".join("pos" if s == POS else str(s) for s in self.shape) + "]"


@dataclass
class TokenInfo:
    ids: list[int]
    strings: list[str]  # the exact text of each token
    display: list[str]  # the same, made visible: spaces as '·', newline as '↵', raw bytes as <0xNN>
    bos: bool  # whether a BOS token was prepended

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self) -> list[str]:
        return [f"{i}: {s}" for i, s in enumerate(self.display)]


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def display_token(text: str, raw_piece: str) -> str:
    if _BYTE_TOKEN.match(raw_piece or "") or "\ufffd" in text:
        return raw_piece if _BYTE_TOKEN.match(raw_piece or "") else repr(raw_piece)[1:-1]
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "\\r")


def _piece_text(tok, token_id: int, piece: str) -> str:
    """The text a token stands for, leading space included (single-token decode drops sentencepiece's space)."""
    if piece is None:
        return tok.decode([token_id])
    if "\u2581" in piece:
        return piece.replace("\u2581", " ")
    if _BYTE_TOKEN.match(piece):
        return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
    if piece in getattr(tok, "all_special_tokens", ()):
        return piece
    return tok.convert_tokens_to_string([piece])


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    info: ModelInfo
    path: str
    config_hash: str
    source_kind: str = "folder"  # or "gguf"
    conformance: object = None  # engine.conformance.Conformance, measured at load
    _hook_points: list[HookPoint] = field(default_factory=list, repr=False)

    @property
    def input_device(self) -> torch.device:
        return self.adapter.embed.weight.device

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    # ---- hook points -------------------------------------------------------------------------------------
    def hook_points(self) -> list[HookPoint]:
        if not self._hook_points:
            self._hook_points = list(self._build_hook_points())
        return self._hook_points

    def _build_hook_points(self):
        i = self.info
        d = (POS, i.d_model)
        yield HookPoint(EMBED, None, EMBED, d, "embed")
        for layer in range(i.n_layers):
            yield HookPoint(hook_name(layer, "resid_pre"), layer, "resid_pre", d, "residual")
            yield HookPoint(hook_name(layer, "attn.hook_z"), layer, "attn.hook_z", (POS, i.n_heads, i.d_head), "attention")
            yield HookPoint(hook_name(layer, "attn.hook_pattern"), layer, "attn.hook_pattern", (i.n_heads, POS, POS), "attention")
            yield HookPoint(hook_name(layer, "attn_out"), layer, "attn_out", d, "attention")
            if not i.parallel_attn_mlp:
                yield HookPoint(hook_name(layer, "resid_mid"), layer, "resid_mid", d, "residual")
            yield HookPoint(hook_name(layer, "mlp_out"), layer, "mlp_out", d, "mlp")
            yield HookPoint(hook_name(layer, "resid_post"), layer, "resid_post", d, "residual")
        if self.adapter.final_norm_in_model:
            yield HookPoint(FINAL_NORM, None, FINAL_NORM, d, "final")

    def hook_point(self, name: str) -> HookPoint:
        for hp in self.hook_points():
            if hp.name == name:
                return hp
        from desktop_app.engine.errors import SpecError
        raise SpecError(f"this model has no hook point {name!r}; it has {self.info.n_layers} layers "
                        f"(0-{self.info.n_layers - 1}) and names like {hook_name(0, 'resid_pre')!r}.")

    def hook_tree(self) -> list[tuple[str, list[tuple[str, list[HookPoint]]]]]:
        """[(node label, [(group label, [hook points])])] in model order, for the layer tree."""
        tree = []
        points = self.hook_points()
        tree.append(("embed", [("embed", [p for p in points if p.group == "embed"])]))
        for layer in range(self.info.n_layers):
            in_layer = [p for p in points if p.layer == layer]
            groups = [(g, [p for p in in_layer if p.group == g]) for g in ("attention", "mlp", "residual")]
            tree.append((f"block {layer}", groups))
        final = [p for p in points if p.group == "final"]
        if final:
            tree.append(("final norm", [("final", final)]))
        return tree

    # ---- tokens ------------------------------------------------------------------------------------------
    def tokenize(self, text: str, prepend_bos: bool | None = None, what: str = "prompt") -> TokenInfo:
        if text is None or not text.strip():
            raise PromptError(f"the {what} is empty; type some text.")
        _check_encodable(text, what)
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=prepend_bos is not False)["input_ids"])
        bos_id = getattr(tok, "bos_token_id", None)
        if prepend_bos is True and (not ids or ids[0] != bos_id):
            if bos_id is None:
                raise PromptError("prepend_bos is set but this tokenizer has no BOS token; set it to false.")
            ids = [bos_id] + ids
        has_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
        if len(ids) > self.info.n_ctx:
            raise PromptError(f"the {what} is {len(ids)} tokens long but the model's context is {self.info.n_ctx}; "
                              "shorten it.")
        return self._token_info(ids, has_bos)

    def _token_info(self, ids: list[int], bos: bool) -> TokenInfo:
        tok = self.tokenizer
        pieces = tok.convert_ids_to_tokens(ids)
        strings = [_piece_text(tok, i, p) for i, p in zip(ids, pieces)]
        display = [display_token(s, p) for s, p in zip(strings, pieces)]
        return TokenInfo(ids=ids, strings=strings, display=display, bos=bos)

    def tokens_of_ids(self, ids) -> TokenInfo:
        ids = [int(i) for i in ids]
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        return self._token_info(ids, bool(ids) and ids[0] == bos_id)

    def token_pieces(self, text: str) -> TokenInfo:
        """The tokens of a short string without special tokens (answers, subjects)."""
        _check_encodable(text, "text")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._token_info(ids, False)

    def single_token_id(self, text: str, what: str = "answer") -> int:
        if not text:
            raise PromptError(f"the {what} is empty; type the single token the model should predict, e.g. ' Mary'.")
        t = self.token_pieces(text)
        if len(t.ids) != 1:
            shown = " | ".join(t.display)
            raise PromptError(f"the {what} {text!r} is {len(t.ids)} tokens ({shown}), not one; "
                              "use a single token of the vocabulary (often with a leading space).")
        return t.ids[0]

    def is_single_token(self, text: str) -> bool:
        return bool(text) and len(self.token_pieces(text).ids) == 1


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
