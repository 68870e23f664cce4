"""``roost bench``: roost vs TorchServe vs the raw model, measured in one run."""

from __future__ import annotations
