"""The template generator dialog (`templateDialog`): a family (IOI, greater-than, factual recall from the
engine's `templates`), a count, a seed, and the family's lists (IOI names; a subject / attribute table).
`pairs()` generates the dataset; the caller pushes it as one undoable edit."""
from __future__ import annotations

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QSpinBox,
                               QTableWidget, QTableWidgetItem, QVBoxLayout)

from desktop_app.engine import templates
from desktop_app.engine.errors import SpecError

FAMILY_LABELS = (("ioi", "IOI (ABC corruption)"), ("greater_than", "greater-than (years)"),
                 ("factual", "factual recall (table)"))
DEFAULT_FACTS = (("The Eiffel Tower", "France"), ("The Colosseum", "Italy"), ("Big Ben", "England"),
                 ("The Brandenburg Gate", "Germany"))


def _named(widget, name, tip=""):
    widget.setObjectName(name)
    if tip:
        widget.setToolTip(tip)
    return widget


class TemplateDialog(QDialog):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("templateDialog")
        self.setWindowTitle("Generate pairs from a template")
        self.family_combo = _named(QComboBox(), "templateFamilyCombo", "The template family")
        for key, label in FAMILY_LABELS:
            self.family_combo.addItem(label, key)
        self.count_spin = _named(QSpinBox(), "templateCountSpin", "How many pairs to generate")
        self.count_spin.setRange(1, 100_000)
        self.count_spin.setValue(32)
        self.seed_spin = _named(QSpinBox(), "templateSeedSpin", "The same seed always gives the same pairs")
        self.seed_spin.setRange(0, 2 ** 31 - 1)
        self.names_edit = _named(QLineEdit(", ".join(templates.DEFAULT_NAMES)), "templateNamesEdit",
                                 "IOI names, separated by commas (at least 5 different ones)")
        self.facts_table = _named(QTableWidget(len(DEFAULT_FACTS) + 2, 2), "templateFactsTable",
                                  "Factual recall rows: a subject and its attribute (empty rows are skipped)")
        self.facts_table.setHorizontalHeaderLabels(["subject", "attribute"])
        self.facts_table.horizontalHeader().setStretchLastSection(True)
        for row, (subject, attribute) in enumerate(DEFAULT_FACTS):
            self.facts_table.setItem(row, 0, QTableWidgetItem(subject))
            self.facts_table.setItem(row, 1, QTableWidgetItem(attribute))
        self.template_edit = _named(QLineEdit(templates.FACTUAL_TEMPLATE), "templateTextEdit",
                                    "The factual prompt; {SUBJECT} is replaced by each row's subject")
        self.error_label = _named(QLabel(""), "templateErrorLabel")
        self.error_label.setStyleSheet("color: #b00020")
        self.error_label.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Family", self.family_combo)
        form.addRow("Pairs", self.count_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Names", self.names_edit)
        form.addRow("Template", self.template_edit)
        form.addRow("Facts", self.facts_table)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.button(QDialogButtonBox.Ok).setText("Generate")
        self.buttons.button(QDialogButtonBox.Ok).setObjectName("templateGenerateButton")
        self.buttons.accepted.connect(self._accept)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error_label)
        lay.addWidget(self.buttons)
        self.family_combo.currentIndexChanged.connect(self._family_changed)
        self._family_changed()
        self.generated = None

    def family(self) -> str:
        return self.family_combo.currentData()

    def _family_changed(self):
        family = self.family()
        self.names_edit.setEnabled(family == "ioi")
        self.facts_table.setEnabled(family == "factual")
        self.template_edit.setEnabled(family == "factual")

    def facts(self) -> list[tuple[str, str]]:
        rows = []
        for row in range(self.facts_table.rowCount()):
            cells = [self.facts_table.item(row, c) for c in (0, 1)]
            subject, attribute = (c.text().strip() if c is not None else "" for c in cells)
            if subject and attribute:
                rows.append((subject, attribute))
            elif subject or attribute:
                raise SpecError(f"facts row {row + 1} needs both a subject and an attribute.")
        return rows

    def pairs(self):
        """The generated pairs (engine PairText list); SpecError in one sentence on bad settings."""
        family, n, seed = self.family(), self.count_spin.value(), self.seed_spin.value()
        options = {}
        if family == "ioi":
            options["names"] = [x.strip() for x in self.names_edit.text().split(",") if x.strip()]
        elif family == "factual":
            options["table"] = self.facts()
            options["template"] = self.template_edit.text()
        return list(templates.generate(family, n, seed, **options).pairs)

    def _accept(self):
        try:
            self.generated = self.pairs()
        except SpecError as err:
            self.error_label.setText(str(err))
            return
        self.accept()
