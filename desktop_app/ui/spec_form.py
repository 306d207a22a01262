"""Widgets of the Analysis panel built from the spec fields' param() metadata (project.specs.param).

One widget per (field name, widget type) across all registered kinds: kinds that share a field (component,
positions, metric ...) share its widget, so switching kind keeps what was chosen where it still applies.
Object names are the field name in camelCase plus the widget's suffix: componentCombo, subjectEdit,
samplesSpin, referencePromptsEdit.
"""
from __future__ import annotations

import dataclasses

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QPlainTextEdit, QSpinBox,
                               QWidget)

from desktop_app.engine.errors import SpecError

_SUFFIX = {"choice": "Combo", "int": "Spin", "float": "Spin", "bool": "Check"}
_INT_MAX = 2**31 - 1


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def field_label(f: dataclasses.Field) -> str:
    return f.metadata.get("label") or f.name.replace("_", " ").capitalize()


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class FieldWidget:
    """One panel widget for a spec field: value() reads it as the spec wants it, set_value() shows a value."""

    def __init__(self, f: dataclasses.Field):
        meta = f.metadata
        self.name, self.kind = f.name, meta["widget"]
        kind = self.kind
        if kind == "choice":
            w = QComboBox()
            w.setEditable(bool(meta["editable"]))
            w.addItems([str(c) for c in meta["choices"]])
        elif kind == "int":
            w = QSpinBox()
            w.setRange(int(meta["minimum"] or 0), int(meta["maximum"] if meta["maximum"] is not None else _INT_MAX))
            if meta["step"]:
                w.setSingleStep(int(meta["step"]))
        elif kind == "float":
            w = QDoubleSpinBox()
            w.setDecimals(4)
            w.setRange(float(meta["minimum"] or 0.0), float(meta["maximum"] if meta["maximum"] is not None else 1e9))
            w.setSingleStep(float(meta["step"] or 0.1))
        elif kind == "bool":
            w = QCheckBox()
        elif kind == "text_list":
            w = QPlainTextEdit()
            w.setPlaceholderText("one per line")
            w.setFixedHeight(64)
        else:  # text, optional_text, path, hook, layers
            w = QLineEdit()
            if kind == "layers":
                w.setPlaceholderText(f"all {f.name.replace('_', ' ')} (or e.g. 0, 2, 5)")
            elif kind in ("optional_text", "hook"):
                w.setPlaceholderText("(none)")
        w.setObjectName(camel(f.name) + _SUFFIX.get(kind, "Edit"))
        w.setToolTip(meta.get("tip") or field_label(f))
        self.widget: QWidget = w
        self.set_value(field_default(f))

    def set_choices(self, choices) -> None:
        """A choice widget shared by kinds with different choices takes the shown kind's; keeps a valid value."""
        w = self.widget
        current = w.currentText()
        choices = [str(c) for c in choices]
        if [w.itemText(i) for i in range(w.count())] == choices:
            return
        w.blockSignals(True)
        w.clear()
        w.addItems(choices)
        if current in choices or w.isEditable():
            w.setCurrentText(current)
        w.blockSignals(False)

    def value(self):
        w, kind = self.widget, self.kind
        if kind == "choice":
            return w.currentText()
        if kind == "int":
            return int(w.value())
        if kind == "float":
            return float(w.value())
        if kind == "bool":
            return bool(w.isChecked())
        if kind == "text_list":
            return tuple(line.strip() for line in w.toPlainText().splitlines() if line.strip())
        text = w.text()
        if kind == "layers":
            return parse_layers(text, self.name)
        if kind in ("optional_text", "hook"):
            return text.strip() or None
        return text

    def set_value(self, value) -> None:
        w, kind = self.widget, self.kind
        if kind == "choice":
            if value is not None:
                if w.findText(str(value)) < 0 and not w.isEditable():
                    return
                w.setCurrentText(str(value))
        elif kind == "int":
            w.setValue(int(value or 0))
        elif kind == "float":
            w.setValue(float(value or 0.0))
        elif kind == "bool":
            w.setChecked(bool(value))
        elif kind == "text_list":
            w.setPlainText("\n".join(value or ()))
        elif kind == "layers":
            w.setText(", ".join(str(v) for v in value) if value else "")
        else:
            w.setText("" if value is None else str(value))


def parse_layers(text: str, name: str = "layers"):
    """"0, 2, 5" -> (0, 2, 5); "" -> None (every layer). SpecError naming the field otherwise."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        return None
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise SpecError(f"field '{name}' must list layer numbers such as 0, 2, 5 (empty: every layer), "
                        f"not {text!r}.") from None
