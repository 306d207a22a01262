"""SAEs in the main window: attach one to a hook point, show its features, run feature edits, build
dashboards over a corpus and train a new SAE with live curves: a controller with explicit dependencies.

Every method that takes a path is what scripts and tests call; the *_dialog methods only ask for the path.
The SAE is loaded and run in the runner thread (sae_worker_jobs); this module only routes and paints.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QDialog, QFileDialog

from desktop_app.engine.errors import WorkbenchError
from desktop_app.project.session import SAEAttachment
from desktop_app.ui import sae_worker_jobs
from desktop_app.ui.training_live import live_training_of
from desktop_app.ui.training_view import TrainDialog

_PANE_ARCHITECTURES = {"relu": "relu_l1"}  # the training dialog's names -> sae_training's `architecture`
_TRAIN_FIELDS = {"l1_coefficient": "l1", "l0_coefficient": "l0"}  # engine TrainConfig names -> spec fields
SAE_FILTERS = "SAE weights (*.safetensors params.npz *.npz);;All files (*)"
CORPUS_FILTERS = "Text corpora (*.txt *.jsonl)"


def choose_sae_path(parent, start: str) -> str:
    """Ask for an SAE: an SAELens / Gemma Scope folder, or a params.npz / .safetensors file.

    A folder is what SAELens writes, so it is asked for first; cancelling that asks for a file instead."""
    folder = QFileDialog.getExistingDirectory(parent, "Choose an SAE folder (Cancel to choose a file)", start)
    if folder:
        return folder
    path, _ = QFileDialog.getOpenFileName(parent, "Choose an SAE file", start, SAE_FILTERS)
    return path


class SAEController:
    """Dependencies: the session; `submit` / `cancel_slot` of the runner; `model()` (the loaded
    worker_jobs.ModelLoaded or None); the SAE pane, the training view and their docks (`resize_docks` gives a
    dock room); the Layers and Analysis panels; `messages` (show_error, show_message, clear); the job label;
    `run_analysis()` (the Analysis panel's Run); `start_dir()` for file dialogs; the dialogs' parent;
    `run_spec(spec, finished=, note=, ended=)` (AnalysisController.run_spec): training, dashboards and metrics
    are analyses of the kinds sae_training / sae_dashboards / sae_metrics, added to the project (undoably) and
    run through the registry, so the project holds them and an exported experiment repeats them."""

    def __init__(self, session, submit, cancel_slot, model, sae_view, training_view, sae_dock, train_dock,
                 resize_docks, layer_panel, analysis_panel, messages, job_label, run_analysis, start_dir, parent,
                 run_spec=None):
        self.session, self.submit, self.cancel_slot, self.model = session, submit, cancel_slot, model
        self.sae_view, self.training_view, self.sae_dock, self.train_dock = sae_view, training_view, sae_dock, train_dock
        self.resize_docks, self.layer_panel, self.analysis_panel = resize_docks, layer_panel, analysis_panel
        self.messages, self.job_label, self.run_analysis = messages, job_label, run_analysis
        self.start_dir, self.parent, self.run_spec = start_dir, parent, run_spec
        self.sae_attached: sae_worker_jobs.SAEAttached | None = None
        self._restoring_sae = False
        self.sae_view.interventionRequested.connect(self.run_intervention)
        self.layer_panel.attach_sae.connect(self.attach_sae_dialog)
        self.layer_panel.train_sae.connect(self.train_sae_dialog)
        self.training_view.cancel_button.clicked.connect(lambda: self.cancel_slot("analysis"))
        # the curves of every sae_training run, from this pane or the Analysis panel, and the end's Attach it
        self.live = live_training_of(run_spec, training_view, train_dock, resize_docks, messages, job_label)
        if self.live is not None:
            self.live.done_actions["sae_training"] = self._attach_trained

    def _sae_start_dir(self) -> str:
        if self.sae_attached is not None:
            return str(Path(self.sae_attached.path).parent)
        return self.start_dir()

    def _need_sae(self) -> bool:
        if self.sae_attached is None:
            self.messages.show_error("no SAE is attached; right-click a hook point in the Layers tree and choose Attach SAE….")
            return False
        return True

    # ---- attaching ----
    def attach_sae_dialog(self, hook: str | None = None):
        hook = hook or self.layer_panel.selected_hook()
        if self.model() is None:
            self.messages.show_error("no model is loaded; load a model before attaching an SAE to one of its hook points.")
            return
        if not hook:
            self.messages.show_error("no hook point is selected; click one in the Layers tree, then choose Attach SAE….")
            return
        path = choose_sae_path(self.parent, self._sae_start_dir())
        if path:
            self.attach_sae(path, hook)

    def attach_sae(self, path, hook: str, restore: bool = False, force_hook: bool | None = None) -> int | None:
        """Load the SAE at `path` for `hook` in the runner, check it through engine/hook_trust.py (an SAE whose
        file names another hook or model is refused in one sentence naming both, unless force_hook: by default
        the pane's forceHookCheck) and its width, then show its features on the clean prompt (an `sae_features`
        analysis, shown in the SAE pane and in the Analyses list).
        restore: the project's saved attachment, reopened: its dashboards and feature edit come back, nothing
        is run and the document does not change."""
        if force_hook is None:
            force_hook = self.sae_view.force_hook_check.isChecked()
        self._restoring_sae = restore
        if self.model() is None:
            self.messages.show_error("no model is loaded; load a model before attaching an SAE to one of its hook points.")
            return None
        self.messages.clear()
        self.job_label.setText(f"loading the SAE for {hook}")
        self.sae_view.title_label.setText(f"Loading {Path(path).name} for {hook}…")
        dock = self.sae_dock
        if not dock.isVisible():
            dock.show()
            # the feature heatmap needs the room (after the dock is laid out, or Qt ignores it)
            QTimer.singleShot(0, lambda: self.resize_docks([dock], [400], Qt.Horizontal))
        return self.submit(sae_worker_jobs.attach_sae(str(path), hook, bool(force_hook)), "sae",
                           finished=self._sae_attached,
                            errored=self._sae_failed)

    def _sae_attached(self, info: sae_worker_jobs.SAEAttached):
        self.sae_attached = info
        if getattr(self, "_restoring_sae", False):
            self._restoring_sae = False
            self._sae_restored(info)
            return
        saved = [a for a in self.session.saes() if a.path == str(info.path) and a.hook == info.hook
                 and a.force_hook == info.force_hook]
        if not saved:  # one attached SAE per window: the new one replaces the saved attachment
            self.session.set_saes([SAEAttachment(str(info.path), info.hook, force_hook=info.force_hook)], "Attach SAE")
        self.job_label.setText("SAE attached")
        self.sae_view.title_label.setText(f"{Path(info.path).name}: {info.summary()}")
        self.sae_dock.raise_()
        self.analysis_panel.set_kind("sae_features")  # the panel's SAE features kind reads the attached SAE
        self.analysis_panel.set_field("sae", info.path)
        self.analysis_panel.set_field("hook", info.hook)
        self.analysis_panel.set_field("force_hook", info.force_hook)
        if info.force_hook and info.trained_on and info.trained_on != info.hook:
            self.messages.show_message(f"the SAE trained on {info.trained_on} is forced to read {info.hook} "
                                       "(force_hook is recorded with its results).", "warning")
        if not self.session.project.prompts.clean:
            self.messages.show_message("SAE attached; type a clean prompt and choose SAE features, Run, to see its "
                              "features.")
            return
        self.run_analysis()

    def _sae_restored(self, info):
        self.job_label.setText("SAE attached")
        self.sae_view.title_label.setText(f"{Path(info.path).name}: {info.summary()}")
        self.analysis_panel.set_kind("sae_features")
        self.analysis_panel.set_field("sae", info.path)
        self.analysis_panel.set_field("hook", info.hook)
        self.analysis_panel.set_field("force_hook", info.force_hook)
        self.sae_view.force_hook_check.setChecked(info.force_hook)
        saved = next((a for a in self.session.saes() if a.hook == info.hook), None)
        if saved is None:
            return
        if saved.dashboards.get("features"):
            self.sae_view.show_dashboards(saved.dashboards["features"])
        if saved.edits:
            request = saved.edits[-1]
            edit = (request.get("edits") or [{}])[0]
            pane = self.sae_view
            pane.feature_spin.setValue(int(edit.get("feature", 0)))
            pane.mode_combo.setCurrentText(str(edit.get("mode", "ablate")))
            pane.value_spin.setValue(float(edit.get("value", 0.0)))
            pane.keep_error_check.setChecked(bool(request.get("keep_error", True)))

    def restore_saes(self):
        """Reattach the SAE the project saved (after its model is loaded); offer to relocate a missing one."""
        saes = self.session.saes()
        if not saes or self.model() is None:
            return
        first = saes[0]
        if self.sae_attached is not None and self.sae_attached.hook == first.hook \
                and str(self.sae_attached.path) == first.path:
            return
        if not Path(first.path).exists():
            def relocate():
                path = choose_sae_path(self.parent, self.start_dir())
                if path:
                    self.session.update_sae(first.hook, "Relocate SAE", path=str(path))
                    self.attach_sae(path, first.hook, restore=True, force_hook=first.force_hook)
            self.messages.show_message(f"the SAE {first.path} saved with this project is missing; choose its new location "
                              f"with Relocate….", "warning", "Relocate…", relocate)
            return
        self.attach_sae(first.path, first.hook, restore=True, force_hook=first.force_hook)

    def _sae_failed(self, message: str, details: str = ""):
        self.job_label.setText("SAE not attached")
        self.sae_view.title_label.setText("Attach an SAE to a hook point to see its features here.")
        self.messages.show_error(message, details)

    # ---- feature edits ----
    def run_intervention(self, request: dict) -> int | None:
        if not self._need_sae():
            return None
        info, pr = self.sae_attached, self.session.project.prompts
        from desktop_app.project.kinds import get

        if not pr.clean:
            self.messages.show_error("type a clean prompt first; the feature edit runs on it.")
            return None
        try:
            spec = get("sae_edit").spec(
                name=f"sae edit {info.hook}", sae=str(info.path), hook=info.hook, prompt="clean",
                edits=[{"feature": e["feature"], "op": e.get("mode", e.get("op", "ablate")), "value": e.get("value", 0.0),
                        "positions": e.get("positions")} for e in request.get("edits", [])],
                keep_error=bool(request.get("keep_error", True)), n_continue=10, force_hook=info.force_hook)
        except WorkbenchError as err:
            self.messages.show_error(str(err))
            return None
        if any(a.hook == info.hook for a in self.session.saes()):
            self.session.update_sae(info.hook, "Edit features", edits=[request])
        self.job_label.setText("running the feature edit")
        return self.run_spec(spec, finished=self._intervention_done)

    def _intervention_done(self, result):
        if result.status != "complete":
            return  # the analysis controller has said why
        self.job_label.setText("feature edit done")
        self.sae_view.show_intervention(result)

    def _sae_job_failed(self, what: str, message: str, details: str):
        self.job_label.setText(f"{what} failed")
        self.messages.show_error(message, details)

    # ---- dashboards ----
    def build_dashboards_dialog(self):
        if not self._need_sae():
            return
        path, _ = QFileDialog.getOpenFileName(self.parent, "Corpus for the dashboards", self._sae_start_dir(),
                                              CORPUS_FILTERS)
        if path:
            self.build_dashboards(path)

    def build_dashboards(self, corpus_path) -> int | None:
        """An sae_dashboards analysis of the attached SAE over `corpus_path` (every feature, densest first)."""
        if not self._need_sae():
            return None
        from desktop_app.engine.sae.dashboards import FeatureDashboard
        from desktop_app.project.kinds import get

        info = self.sae_attached
        self._dashboards_corpus = str(corpus_path)
        spec = get("sae_dashboards").spec(name=f"sae dashboards {info.hook}", sae=str(info.path),
                                          corpus=str(corpus_path), hook=info.hook, top_n=int(info.d_sae),
                                          force_hook=info.force_hook)

        def shown(result):
            from desktop_app.project.kinds._sae_exports import dashboards_of
            self._dashboards_done([FeatureDashboard.from_dict(d) for d in dashboards_of(result)])
        return self.run_spec(spec, finished=shown)

    def build_metrics(self, corpus_path, max_texts: int = 200) -> int | None:
        """An sae_metrics analysis of the attached SAE over `corpus_path` (L0, explained variance, CE, KL)."""
        if not self._need_sae():
            return None
        from desktop_app.project.kinds import get

        info = self.sae_attached
        spec = get("sae_metrics").spec(name=f"sae metrics {info.hook}", sae=str(info.path), corpus=str(corpus_path),
                                       hook=info.hook, max_texts=int(max_texts), force_hook=info.force_hook)
        return self.run_spec(spec)

    def build_metrics_dialog(self):
        if not self._need_sae():
            return
        path, _ = QFileDialog.getOpenFileName(self.parent, "Corpus for the SAE metrics", self._sae_start_dir(),
                                              CORPUS_FILTERS)
        if path:
            self.build_metrics(path)

    def _dashboards_done(self, dashboards):
        if not dashboards:
            self.job_label.setText("dashboards cancelled")
            return
        self.job_label.setText(f"{len(dashboards)} dashboards")
        self.sae_view.show_dashboards(dashboards)
        info = self.sae_attached
        if info is not None and any(a.hook == info.hook for a in self.session.saes()):
            try:
                self.session.update_sae(info.hook, "Build dashboards", dashboards={
                    "corpus": getattr(self, "_dashboards_corpus", ""), "features": [d.to_dict() for d in dashboards]})
            except ValueError as err:  # a non-finite number cannot go into the project file
                self.messages.show_message(f"the dashboards are shown but cannot be saved with the project ({err}).",
                                  "warning")
        self.sae_view.tabs.setCurrentIndex(1)
        self.sae_dock.show()
        self.sae_dock.raise_()

    # ---- training ----
    def _hook_names(self) -> list[str]:
        names = []
        for _node, groups in (self.model().tree if self.model() else []):
            for _group, points in groups:
                names += [name for name, kind, _shape in points if kind != "attn.hook_pattern"]
        return names

    def train_sae_dialog(self, hook: str | None = None):
        if self.model() is None:
            self.messages.show_error("no model is loaded; load the model whose activations the SAE should learn.")
            return
        dialog = TrainDialog(self._hook_names(), hook or self.layer_panel.selected_hook(), self._sae_start_dir(),
                             self.parent)
        if dialog.exec() == QDialog.Accepted:
            self.train_sae(**dialog.settings())

    def train_sae(self, hook: str, corpus, out_folder, architecture: str = "topk", width: int = 256,
                  k: int = 16, steps: int = 2000, **config) -> int | None:
        """Train an SAE at `hook` on a local corpus, writing it to out_folder; curves fill in live."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; load the model whose activations the SAE should learn.")
            return None
        if not str(corpus).strip() or not str(out_folder).strip():
            self.messages.show_error("SAE training needs a corpus file and an output folder; choose both.")
            return None
        from desktop_app.project.kinds import get

        fields = {_TRAIN_FIELDS.get(key, key): value for key, value in config.items() if key != "log_every"}
        try:
            spec = get("sae_training").spec(
                name=f"sae training {hook}", hook=hook, corpus=str(corpus), out=str(out_folder),
                architecture=_PANE_ARCHITECTURES.get(architecture, architecture), width=int(width),
                k=min(int(k), int(width)), steps=int(steps), **fields)
        except (TypeError, ValueError, WorkbenchError) as err:  # a bad setting: one sentence
            self.messages.show_error(str(err))
            return None
        return self.run_spec(spec)

    def _attach_trained(self, result):
        """The done message's button: attach the SAE a training run wrote, at its hook point."""
        folder, hook = str(result.params.get("out_folder", "")), str(result.params.get("hook", ""))
        return "Attach it", lambda: self.attach_sae(folder, hook)
