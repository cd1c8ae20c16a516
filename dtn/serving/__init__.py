"""Serving: ``dtn export`` artifacts (:mod:`dtn.serving.export`) and their predictor (:mod:`dtn.serving.predict`)."""
from .export import FlatModel, export_model, export_program
from .predict import InputError, Predictor

__all__ = ["FlatModel", "export_model", "export_program", "InputError", "Predictor"]
