"""Lineage of a registered model version: from a served answer back to its data.

``roost lineage`` assembles one document from the places that hold each fact, keeping none
of them twice: the MLflow registry and tracking server (:mod:`roost.lineage.mlflow_facts`),
the cluster (:mod:`roost.lineage.cluster`), the local servers (:mod:`roost.lineage.local`) and
the monitor's payload store (:mod:`roost.lineage.requests`). A fact that is not recorded
is listed under ``missing`` in words, never guessed.
"""

from __future__ import annotations

from roost.lineage.core import Ref, build, parse_ref

__all__ = ["Ref", "build", "parse_ref"]
