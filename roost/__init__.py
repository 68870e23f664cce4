"""roost: train, register, promote and canary-serve PyTorch models on Kubernetes."""

from __future__ import annotations

__version__ = "0.1.0"
