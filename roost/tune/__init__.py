"""Hyper-parameter tuning: ``roost tune`` (Optuna studies, each trial a nested MLflow run).

Modules: ``space`` (the search space, pure), ``policy`` (what a worker does next, pure),
``storage`` (Optuna storages with heartbeats), ``study`` (objective, workers, MLflow
record), ``local`` (K worker processes on one machine), ``cluster`` (the worker Job).
Nothing here imports optuna, torch or mlflow at module import except ``study``/``storage``.
"""
