"""Text that UTF-8 cannot encode (a lone surrogate from a JSON `\\ud800` escape or a bad clipboard) is
stored escaped instead of failing a save: each such character becomes the six characters `\\udXXX`, and an
`EscapedTextWarning` says which fields were changed.
"""
from __future__ import annotations

import json
import re
import warnings
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


class EscapedTextWarning(UserWarning):
    """Some text could not be encoded as UTF-8 and was stored with its bad characters escaped."""


def escape_surrogates(text: str) -> str:
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _escape(obj: Any, where: str, changed: list[str]) -> Any:
    if isinstance(obj, str):
        if _SURROGATE.search(obj):
            changed.append(where or "a value")
            return escape_surrogates(obj)
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = _escape(k, f"{where}.{k!s}" if where else str(k), changed) if isinstance(k, str) else k
            out[key] = _escape(v, f"{where}.{escape_surrogates(str(k))}" if where else escape_surrogates(str(k)),
                               changed)
        return out
    if isinstance(obj, (list, tuple)):
        return [_escape(v, f"{where}[{i}]", changed) for i, v in enumerate(obj)]
    return obj


def encode_json_document(doc: Any, indent: int | None = None) -> bytes:
    """UTF-8 JSON bytes of `doc`; text that cannot be encoded is escaped, with an EscapedTextWarning."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    changed: list[str] = []
    safe = _escape(doc, "", changed)
    fields = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    warnings.warn(EscapedTextWarning(
        f"text in {fields} held characters that cannot be stored as UTF-8 (lone surrogates); they were "
        f"saved escaped as \\uXXXX"), stacklevel=2)
    return json.dumps(safe, indent=indent, ensure_ascii=False, allow_nan=False).encode("utf-8")
