"""The ``queuegate`` command line: typer commands that parse options, call the shared
actions and reports (``admin``, ``accounting``, ``producer``...) and render what they return.

Importing the package imports nothing else: its entry point (``cli.entry``) must run first.
"""
