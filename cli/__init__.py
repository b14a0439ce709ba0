"""The ``queuegate`` command line: typer commands that parse options, call the shared
actions and reports (``admin``, ``accounting``, ``producer``...) and render what they return."""

from cli.main import app, main

__all__ = ["app", "main"]
