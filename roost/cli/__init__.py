"""The ``roost`` command line (typer): parses input, calls the core, renders output."""
