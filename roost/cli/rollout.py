"""``roost rollout ...``: progressive delivery driven by registry aliases."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Canary a model version, analyse it, promote or roll back.")
