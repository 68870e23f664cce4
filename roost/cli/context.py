"""What every command reads from the root command: the config file and state dir it was given.

The root callback in ``cli/app.py`` stores a :class:`CliState` on the click context; the command
modules read it with :func:`state`. Both import this module, so no command imports ``app.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from roost.config import Settings


@dataclass
class CliState:
    config_file: Path | None = None
    state_dir: Path | None = None

    def settings(self, **flags: Any) -> Settings:
        """Settings with the flags the user set (dotted keys, None = not set) on top."""
        from roost.config import load_settings, nested  # pydantic: not needed for --help

        overrides = nested(flags)
        if self.state_dir is not None:
            overrides["state_dir"] = self.state_dir
        return load_settings(self.config_file, overrides)


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()
