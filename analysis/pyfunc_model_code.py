"""The file MLflow builds a cell's logged model from ("models from code", `analysis.pyfunc_model`):
the model is this code plus the fold weights, never an unpickled Python object."""

import mlflow

from analysis.pyfunc_model import FoldEnsembleModel

mlflow.models.set_model(FoldEnsembleModel())
