"""SAEs in the main window: attach one to a hook point, show its features, run feature edits, build
dashboards over a corpus and train a new SAE with live curves. A mixin of MainWindow.

Every method that takes a path is what scripts and tests call; the *_dialog methods only ask for the path.
The SAE is loaded and run in the runner thread (sae_worker_jobs); this module only routes and paints.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QDialog, QFileDialog

from desktop_app.ui import sae_worker_jobs
from desktop_app.ui.training_view import ARCHITECTURES, TrainDialog

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


class SAEMixin:
    def _init_sae(self):
        self.sae_attached: sae_worker_jobs.SAEAttached | None = None
        self.sae_view.interventionRequested.connect(self.run_intervention)
        self.layer_panel.attach_sae.connect(self.attach_sae_dialog)
        self.layer_panel.train_sae.connect(self.train_sae_dialog)
        self.training_view.cancel_button.clicked.connect(lambda: self.runner.cancel_slot("sae_train"))

    def _sae_start_dir(self) -> str:
        if self.sae_attached is not None:
            return str(Path(self.sae_attached.path).parent)
        return self._start_dir()

    def _need_sae(self) -> bool:
        if self.sae_attached is None:
            self.show_error("no SAE is attached; right-click a hook point in the Layers tree and choose Attach SAE….")
            return False
        return True

    # ---- attaching ----
    def attach_sae_dialog(self, hook: str | None = None):
        hook = hook or self.layer_panel.selected_hook()
        if self.model_loaded is None:
            self.show_error("no model is loaded; load a model before attaching an SAE to one of its hook points.")
            return
        if not hook:
            self.show_error("no hook point is selected; click one in the Layers tree, then choose Attach SAE….")
            return
        path = choose_sae_path(self, self._sae_start_dir())
        if path:
            self.attach_sae(path, hook)

    def attach_sae(self, path, hook: str) -> int | None:
        """Load the SAE at `path` for `hook` in the runner, check its width, then show its features on the
        clean prompt (an `sae_features` analysis, shown in the SAE pane and as a result tab)."""
        if self.model_loaded is None:
            self.show_error("no model is loaded; load a model before attaching an SAE to one of its hook points.")
            return None
        self.message_bar.clear()
        self.job_label.setText(f"loading the SAE for {hook}")
        self.sae_view.title_label.setText(f"Loading {Path(path).name} for {hook}…")
        dock = self.docks["saeDock"]
        if not dock.isVisible():
            dock.show()
            # the feature heatmap needs the room (after the dock is laid out, or Qt ignores it)
            QTimer.singleShot(0, lambda: self.resizeDocks([dock], [400], Qt.Horizontal))
        return self._submit(sae_worker_jobs.attach_sae(str(path), hook), "sae", finished=self._sae_attached,
                            errored=self._sae_failed)

    def _sae_attached(self, info: sae_worker_jobs.SAEAttached):
        self.sae_attached = info
        self.job_label.setText("SAE attached")
        self.sae_view.title_label.setText(f"{Path(info.path).name}: {info.summary()}")
        self.docks["saeDock"].raise_()
        self.analysis_panel.set_kind("sae_features")  # the panel's SAE features kind reads the attached SAE
        self.analysis_panel.set_field("sae", info.path)
        self.analysis_panel.set_field("hook", info.hook)
        if info.trained_on and info.trained_on != info.hook:
            self.show_message(f"the SAE was trained on {info.trained_on} and is now reading {info.hook}; its "
                              "features may mean little there.", "warning")
        if not self.project.prompts.clean:
            self.show_message("SAE attached; type a clean prompt and choose SAE features, Run, to see its "
                              "features.")
            return
        self.run_analysis()

    def _sae_failed(self, message: str, details: str = ""):
        self.job_label.setText("SAE not attached")
        self.sae_view.title_label.setText("Attach an SAE to a hook point to see its features here.")
        self.show_error(message, details)

    # ---- feature edits ----
    def run_intervention(self, request: dict) -> int | None:
        if not self._need_sae():
            return None
        info, pr = self.sae_attached, self.project.prompts
        self.job_label.setText("running the feature edit")
        job = sae_worker_jobs.intervention(info.path, info.hook, pr.clean, request, pr.prepend_bos)
        return self._submit(job, "sae_edit", finished=self._intervention_done,
                            errored=lambda m, d: self._sae_job_failed("feature edit", m, d))

    def _intervention_done(self, result):
        self.job_label.setText("feature edit done")
        self.sae_view.show_intervention(result)

    def _sae_job_failed(self, what: str, message: str, details: str):
        self.job_label.setText(f"{what} failed")
        self.show_error(message, details)

    # ---- dashboards ----
    def build_dashboards_dialog(self):
        if not self._need_sae():
            return
        path, _ = QFileDialog.getOpenFileName(self, "Corpus for the dashboards", self._sae_start_dir(),
                                              CORPUS_FILTERS)
        if path:
            self.build_dashboards(path)

    def build_dashboards(self, corpus_path) -> int | None:
        if not self._need_sae():
            return None
        info = self.sae_attached
        self.job_label.setText("building dashboards")
        return self._submit(sae_worker_jobs.dashboards(info.path, info.hook, str(corpus_path)), "sae_dash",
                            progress=lambda d, t, m: self.job_label.setText(m),
                            finished=self._dashboards_done, cancelled=self._dashboards_done,
                            errored=lambda m, d: self._sae_job_failed("dashboards", m, d))

    def _dashboards_done(self, dashboards):
        if not dashboards:
            self.job_label.setText("dashboards cancelled")
            return
        self.job_label.setText(f"{len(dashboards)} dashboards")
        self.sae_view.show_dashboards(dashboards)
        self.sae_view.tabs.setCurrentIndex(1)
        self.docks["saeDock"].show()
        self.docks["saeDock"].raise_()

    # ---- training ----
    def _hook_names(self) -> list[str]:
        names = []
        for _node, groups in (self.model_loaded.tree if self.model_loaded else []):
            for _group, points in groups:
                names += [name for name, kind, _shape in points if kind != "attn.hook_pattern"]
        return names

    def train_sae_dialog(self, hook: str | None = None):
        if self.model_loaded is None:
            self.show_error("no model is loaded; load the model whose activations the SAE should learn.")
            return
        dialog = TrainDialog(self._hook_names(), hook or self.layer_panel.selected_hook(), self._sae_start_dir(),
                             self)
        if dialog.exec() == QDialog.Accepted:
            self.train_sae(**dialog.settings())

    def train_sae(self, hook: str, corpus, out_folder, architecture: str = "topk", width: int = 256,
                  k: int = 16, steps: int = 2000, **config) -> int | None:
        """Train an SAE at `hook` on a local corpus, writing it to out_folder; curves fill in live."""
        if self.model_loaded is None:
            self.show_error("no model is loaded; load the model whose activations the SAE should learn.")
            return None
        if not str(corpus).strip() or not str(out_folder).strip():
            self.show_error("SAE training needs a corpus file and an output folder; choose both.")
            return None
        arch = dict(ARCHITECTURES).get(architecture, architecture)
        cfg = dict(architecture=arch, d_sae=int(width), k=min(int(k), int(width)), steps=int(steps), **config)
        view = self.training_view
        view.start(f"training a {architecture} SAE with {width} features at {hook}…")
        self.docks["trainDock"].show()
        self.docks["trainDock"].raise_()
        self.job_label.setText("training an SAE")
        job = sae_worker_jobs.train(hook, str(corpus), str(out_folder), cfg)
        return self._submit(job, "sae_train", note=self._train_note,
                            progress=lambda d, t, m: view.status_label.setText(m),
                            finished=self._train_done, cancelled=self._train_done, errored=self._train_failed)

    def _train_note(self, event):
        if hasattr(event, "explained_variance"):
            self.training_view.add_metrics(event)

    def _train_done(self, result):
        if result is None:  # cancelled while the activations were collected: nothing was trained
            self.training_view.finish("training was cancelled before the first step; nothing was saved.")
            self.job_label.setText("training cancelled")
            return
        folder = str(result.params.get("out_folder", ""))
        text = result.message or f"trained {result.params.get('steps_done')} steps; the SAE is saved in {folder}"
        self.training_view.finish(text)
        self.job_label.setText("training done" if result.status == "complete" else "training stopped")
        hook = str(result.params.get("hook", ""))
        self.show_message(text + ".", "info" if result.status == "complete" else "warning", "Attach it",
                          lambda: self.attach_sae(folder, hook))

    def _train_failed(self, message: str, details: str = ""):
        self.training_view.finish("training failed: " + message)
        self._sae_job_failed("training", message, details)
