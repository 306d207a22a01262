"""Interp Workbench: an offline desktop workbench for mechanistic interpretability."""

__version__ = "0.1.0"
