"""The project document layer (Qt-free, torch-free): experiment specs, the Project, .iwb files, undo.

Submodules: specs, kinds (the analysis-kind registry), execute, experiment, document, iwb, atomic, autosave,
recent, undo, data_export.
"""
from desktop_app.project.document import AnalysisEntry, Project
from desktop_app.project.experiment import Experiment, load_experiment
from desktop_app.project.iwb import SCHEMA_VERSION, load_project, save_project
from desktop_app.project.specs import ANALYSIS_KINDS, ModelRef, Prompts, analysis_from_dict

__all__ = ["ANALYSIS_KINDS", "AnalysisEntry", "Experiment", "ModelRef", "Project", "Prompts", "SCHEMA_VERSION",
           "analysis_from_dict", "load_experiment", "load_project", "save_project"]
