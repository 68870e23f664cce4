"""``python -m roost`` runs the CLI (the same entry point as the ``roost`` script)."""

from __future__ import annotations

from roost.cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())
