"""The dock panels: model, prompts, layer tree, analysis, and the message bar. Widgets only; the window wires
them to the runner and the project."""
from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QFrame, QHBoxLayout, QLabel, QLineEdit, QMenu,
                               QProgressBar, QPushButton, QSpinBox, QStyle, QToolButton, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from desktop_app.project import kinds
from desktop_app.project.specs import panel_fields
from desktop_app.ui.spec_form import FieldWidget, field_default, field_label

# hook kind in the layer tree -> patching component
HOOK_COMPONENT = {"resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
                  "attn_out": "attn_out", "mlp_out": "mlp_out", "attn.hook_z": "head_out"}


def _named(widget, name: str, tip: str):
    widget.setObjectName(name)
    widget.setToolTip(tip)
    return widget


class MessageBar(QFrame):
    """A non-modal message strip: one sentence, optional Details, optional action button, close."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("messageBar")
        self.setFrameShape(QFrame.StyledPanel)
        self.setAutoFillBackground(True)
        self.icon = _named(QLabel(), "messageIcon", "")
        self.icon.setFixedSize(20, 20)
        self.label = _named(QLabel(), "messageLabel", "The last message")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.details_button = _named(QPushButton("Details"), "messageDetailsButton", "Show the technical details")
        self.action_button = _named(QPushButton(), "messageActionButton", "")
        self.close_button = _named(QToolButton(), "messageCloseButton", "Hide this message")
        self.close_button.setText("✕")
        self.details = _named(QLabel(), "messageDetails", "Technical details of the message")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.details.hide()
        row = QHBoxLayout()
        row.addWidget(self.icon)
        row.addWidget(self.label, 1)
        row.addWidget(self.action_button)
        row.addWidget(self.details_button)
        row.addWidget(self.close_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 4, 4, 4)
        lay.addLayout(row)
        lay.addWidget(self.details)
        self.details_button.clicked.connect(lambda: self.details.setVisible(not self.details.isVisible()))
        self.close_button.clicked.connect(self.clear)
        self.action_button.clicked.connect(self._run_action)
        self._action = None
        self.level = ""
        self.hide()

    # error / warning / info: a standard icon (drawn by the style, no font needed) and a colour of its own
    LEVELS = {"error": (QStyle.SP_MessageBoxCritical, "#f8d7da", "#842029", "#f1aeb5", "Error"),
              "warning": (QStyle.SP_MessageBoxWarning, "#fff3cd", "#664d03", "#ffda6a", "Warning"),
              "info": (QStyle.SP_MessageBoxInformation, "#cfe2ff", "#084298", "#9ec5fe", "Information")}

    def show_message(self, text: str, level: str = "info", details: str = "", action_text: str = "", action=None):
        self.level = level
        pixmap, bg, fg, border, word = self.LEVELS.get(level, self.LEVELS["info"])
        self.icon.setPixmap(self.style().standardIcon(pixmap).pixmap(18, 18))
        self.icon.setToolTip(word)
        self.icon.setAccessibleName(word)
        self.setStyleSheet(f"#messageBar {{ background: {bg}; border: 1px solid {border}; border-radius: 4px; }} "
                           f"#messageBar QLabel {{ color: {fg}; }}")
        self.label.setText(text)
        self.details.setText(details)
        self.details.hide()
        self.details_button.setVisible(bool(details))
        self._action = action
        self.action_button.setText(action_text)
        self.action_button.setToolTip(action_text)
        self.action_button.setVisible(bool(action_text))
        self.show()

    def text(self) -> str:
        return self.label.text()

    def clear(self):
        self.level = ""
        self.label.setText("")
        self.hide()

    def _run_action(self):
        action, self._action = self._action, None
        self.hide()
        if action is not None:
            action()


class ModelPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.path_edit = _named(QLineEdit(), "modelPathEdit",
                                "A local Hugging Face model folder (config.json + weights) or a .gguf file")
        self.path_edit.setPlaceholderText("model folder or .gguf file")
        self.browse_button = _named(QPushButton("Folder…"), "browseModelButton", "Choose a model folder")
        self.browse_gguf_button = _named(QPushButton(".gguf…"), "browseGgufButton", "Choose a .gguf file")
        self.dtype_combo = _named(QComboBox(), "dtypeCombo", "Number format of the weights (auto: the model's own)")
        self.dtype_combo.addItems(["auto", "float32", "float16", "bfloat16"])
        self.quantize_combo = _named(QComboBox(), "quantizeCombo",
                                     "Store the linear layers in 8 or 4 bits (bitsandbytes) to save memory")
        self.quantize_combo.addItems(["none", "int8", "int4"])
        self.device_combo = _named(QComboBox(), "deviceCombo",
                                   "Where the model runs (auto: the GPU if there is one); you can type cuda:1")
        self.device_combo.setEditable(True)
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.trust_check = _named(QCheckBox("Trust remote code"), "trustRemoteCodeCheck",
                                  "Allow Python code shipped with the model folder to run (only for folders you trust)")
        self.load_button = _named(QPushButton("Load"), "loadModelButton", "Load the model (Ctrl+O chooses a folder)")
        self.unload_button = _named(QPushButton("Unload"), "unloadModelButton", "Free the memory of the loaded model")
        self.unload_button.setEnabled(False)
        self.progress = _named(QProgressBar(), "modelProgressBar", "Loading progress")
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.summary = _named(QLabel("No model loaded."), "modelSummaryLabel", "The loaded model")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # a wrapped label's minimum height is one line: keep room for the model line and the conformance line
        self.summary.setMinimumHeight(4 * self.summary.fontMetrics().lineSpacing())

        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(self.browse_button)
        path_row.addWidget(self.browse_gguf_button)
        opts = QHBoxLayout()
        opts.addWidget(QLabel("dtype"))
        opts.addWidget(self.dtype_combo)
        opts.addWidget(QLabel("quantize"))
        opts.addWidget(self.quantize_combo)
        opts.addWidget(QLabel("device"))
        opts.addWidget(self.device_combo)
        opts.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.trust_check)
        buttons.addStretch(1)
        buttons.addWidget(self.load_button)
        buttons.addWidget(self.unload_button)
        lay = QVBoxLayout(self)
        lay.addLayout(path_row)
        lay.addLayout(opts)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.summary)
        lay.addStretch(1)


class ChipsLabel(QLabel):
    """Tokens as chips with their positions, drawn with palette colours (light and dark mode alike)."""

    def __init__(self, name: str, tip: str):
        super().__init__()
        _named(self, name, tip)
        self.setWordWrap(True)
        self.setTextFormat(Qt.RichText)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.tokens: list[str] = []

    def set_tokens(self, tokens: list[str] | None, note: str = "", prefix: str = "", positions: bool = True):
        self.tokens = list(tokens or [])
        bg = self.palette().color(QPalette.AlternateBase).name()
        dim = self.palette().color(QPalette.PlaceholderText).name()
        chips = [f"<span style='background-color:{bg}'>&nbsp;{html.escape(t)}&nbsp;</span>"
                 + (f"<sub style='color:{dim}'>{i}</sub>" if positions else "") for i, t in enumerate(self.tokens)]
        text = prefix + " ".join(chips)
        if note:
            text += ("<br>" if text else "") + f"<b>⚠ {html.escape(note)}</b>"
        self.setText(text)


class PromptsPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.clean_edit = _named(QLineEdit(), "cleanPromptEdit", "The clean prompt: the behaviour you study")
        self.corrupted_edit = _named(QLineEdit(), "corruptedPromptEdit",
                                     "The corrupted prompt: the same length in tokens, the behaviour changed")
        self.answer_edit = _named(QLineEdit(), "answerEdit",
                                  "The clean prompt's answer: one token, usually with a leading space (' Mary')")
        self.wrong_edit = _named(QLineEdit(), "wrongAnswerEdit",
                                 "The corrupted prompt's answer: one token (' John')")
        self.clean_chips = ChipsLabel("cleanTokens", "Tokens of the clean prompt with their positions")
        self.corrupted_chips = ChipsLabel("corruptedTokens", "Tokens of the corrupted prompt with their positions")
        self.answer_chips = ChipsLabel("answerTokens", "Tokens of the answers (each must be one token)")
        self.clean_edit.setPlaceholderText("When Mary and John went to the store, John gave a drink to")
        self.corrupted_edit.setPlaceholderText("When Mary and John went to the store, Mary gave a drink to")
        self.answer_edit.setPlaceholderText(" Mary")
        self.wrong_edit.setPlaceholderText(" John")
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 2, 4, 2)
        form = QFormLayout()
        form.setVerticalSpacing(2)
        outer.addLayout(form)
        outer.addStretch(1)
        form.addRow("Clean", self.clean_edit)
        form.addRow("", self.clean_chips)
        form.addRow("Corrupted", self.corrupted_edit)
        form.addRow("", self.corrupted_chips)
        answers = QHBoxLayout()
        answers.addWidget(QLabel("Answer"))
        answers.addWidget(self.answer_edit)
        answers.addWidget(QLabel("Wrong"))
        answers.addWidget(self.wrong_edit)
        form.addRow(answers)
        form.addRow("", self.answer_chips)

    def edits(self) -> dict[str, QLineEdit]:
        return {"clean": self.clean_edit, "corrupted": self.corrupted_edit, "answer": self.answer_edit,
                "wrong_answer": self.wrong_edit}

    def clear_chips(self, note: str = ""):
        self.clean_chips.set_tokens([], note)
        self.corrupted_chips.set_tokens([])
        self.answer_chips.set_tokens([])


class LayerTreePanel(QWidget):
    patch_here = Signal(str, str)  # hook name, hook kind
    attach_sae = Signal(str)  # hook name
    train_sae = Signal(str)  # hook name
    checked_changed = Signal(list)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.tree = _named(QTreeWidget(), "layerTree",
                           "Hook points of the loaded model; right-click a hook point for actions")
        self.tree.setHeaderLabels(["hook point", "shape"])
        self.tree.setContextMenuPolicy(Qt.CustomContextMenu)
        self.tree.customContextMenuRequested.connect(self._menu)
        self.tree.itemChanged.connect(lambda *_: self.checked_changed.emit(self.checked()))
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.tree)

    def set_tree(self, tree: list | None, checked=()):
        self.tree.blockSignals(True)
        self.tree.clear()
        checked = set(checked)
        for node, groups in tree or []:
            top = QTreeWidgetItem([node, ""])
            self.tree.addTopLevelItem(top)
            for group, points in groups:
                parent = top
                if len(groups) > 1:
                    parent = QTreeWidgetItem([group, ""])
                    top.addChild(parent)
                for name, kind, shape in points:
                    label = "heads (hook_z)" if kind == "attn.hook_z" else name.rsplit(".", 1)[-1]
                    item = QTreeWidgetItem([label, shape])
                    item.setData(0, Qt.UserRole, (name, kind))
                    item.setToolTip(0, name)
                    item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                    item.setCheckState(0, Qt.Checked if name in checked else Qt.Unchecked)
                    parent.addChild(item)
        self.tree.expandToDepth(0)
        self.tree.resizeColumnToContents(0)
        self.tree.blockSignals(False)

    def checked(self) -> list[str]:
        out = []
        it = [self.tree.topLevelItem(i) for i in range(self.tree.topLevelItemCount())]
        while it:
            item = it.pop(0)
            data = item.data(0, Qt.UserRole)
            if data and item.checkState(0) == Qt.Checked:
                out.append(data[0])
            it.extend(item.child(i) for i in range(item.childCount()))
        return out

    def selected_hook(self) -> str | None:
        """The hook point of the current tree item, or None when a layer or nothing is selected."""
        item = self.tree.currentItem()
        data = item.data(0, Qt.UserRole) if item is not None else None
        return data[0] if data else None

    def _menu(self, pos):
        item = self.tree.itemAt(pos)
        data = item.data(0, Qt.UserRole) if item is not None else None
        menu = QMenu(self)
        patch = menu.addAction("Patch sweep here")
        patch.setEnabled(bool(data) and data[1] in HOOK_COMPONENT)
        attach = menu.addAction("Attach SAE…")
        attach.setToolTip("Read this hook point with a sparse autoencoder (SAELens folder, params.npz, .safetensors)")
        train = menu.addAction("Train SAE here…")
        for act in (attach, train):
            act.setEnabled(bool(data) and data[1] != "attn.hook_pattern")
        chosen = menu.exec(self.tree.viewport().mapToGlobal(pos))
        if not data or chosen is None:
            return
        if chosen is patch:
            self.patch_here.emit(*data)
        elif chosen is attach:
            self.attach_sae.emit(data[0])
        elif chosen is train:
            self.train_sae.emit(data[0])


class AnalysisPanel(QWidget):
    """The kind combo and, for the chosen kind, one row per spec field (built from the registry's param()
    metadata), the batch size, Run / Cancel and the progress of the running analysis."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.kind_combo = _named(QComboBox(), "analysisKindCombo", "Which analysis to run")
        self.records = {r.kind: r for r in kinds.all_kinds()}
        for record in self.records.values():
            self.kind_combo.addItem(record.label, record.kind)
            if record.description:
                self.kind_combo.setItemData(self.kind_combo.count() - 1, record.description, Qt.ToolTipRole)
        self.batch_spin = _named(QSpinBox(), "batchSizeSpin",
                                 "Cells per forward pass (0: as many as memory allows); lower it after out-of-memory")
        self.batch_spin.setRange(0, 4096)
        self.batch_spin.setSpecialValueText("auto")
        self.run_button = _named(QPushButton("Run"), "runButton", "Run the analysis (Ctrl+R or F5)")
        self.cancel_button = _named(QPushButton("Cancel"), "cancelButton",
                                    "Stop the running analysis and keep the finished cells (Esc)")
        self.cancel_button.setEnabled(False)
        self.progress = _named(QProgressBar(), "progressBar", "Steps done of the running analysis (cells, pairs or samples, as its progress says)")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m")
        self.rate_label = _named(QLabel(" "), "progressRateLabel", "Speed and time left of the running analysis")

        form = QFormLayout(self)
        form.addRow("Analysis", self.kind_combo)
        self._form = form
        self.fields: dict[tuple[str, str], FieldWidget] = {}  # (field name, widget type) -> its widget
        self._kind_fields: dict[str, list] = {}  # kind -> [(dataclasses.Field, FieldWidget)]
        for record in self.records.values():
            rows = []
            for f in panel_fields(record.spec):
                key = (f.name, f.metadata["widget"])
                if key not in self.fields:
                    self.fields[key] = FieldWidget(f)
                    form.addRow(field_label(f), self.fields[key].widget)
                rows.append((f, self.fields[key]))
            self._kind_fields[record.kind] = rows
        form.addRow("Batch", self.batch_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.rate_label)
        self._shown: set = set()
        self.kind_combo.currentIndexChanged.connect(self._kind_changed)
        self._kind_changed()

    def kind(self) -> str:
        return self.kind_combo.currentData()

    def record(self):
        return self.records[self.kind()]

    def widget(self, field: str):
        """The widget of `field` of the current kind (None when the kind has no such field)."""
        for f, fw in self._kind_fields.get(self.kind(), []):
            if f.name == field:
                return fw.widget
        return None

    def set_kind(self, kind: str) -> None:
        index = self.kind_combo.findData(kind)
        if index >= 0:
            self.kind_combo.setCurrentIndex(index)

    def set_field(self, field: str, value) -> None:
        for f, fw in self._kind_fields.get(self.kind(), []):
            if f.name == field:
                fw.set_value(value)

    def values(self) -> dict:
        """The current kind's field values as its spec wants them (SpecError for an unreadable entry)."""
        return {f.name: fw.value() for f, fw in self._kind_fields[self.kind()]}

    def _kind_changed(self, *_):
        rows = self._kind_fields.get(self.kind(), [])
        shown = {id(fw) for _f, fw in rows}
        for fw in self.fields.values():
            self._form.setRowVisible(fw.widget, id(fw) in shown)
        for f, fw in rows:
            fw.widget.setToolTip(f.metadata.get("tip") or field_label(f))  # kinds sharing a widget differ here
            if fw.kind == "choice":
                fw.set_choices(f.metadata["choices"])
            if id(fw) not in self._shown:  # newly shown: this kind's default
                fw.set_value(field_default(f))
        self._shown = shown

    def show_spec(self, spec) -> None:
        """Set the controls to an analysis spec (a project's analysis, the demo's first one)."""
        if spec.kind not in self.records:
            return
        self.set_kind(spec.kind)
        for f, fw in self._kind_fields[spec.kind]:
            fw.set_value(getattr(spec, f.name))

    def set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
