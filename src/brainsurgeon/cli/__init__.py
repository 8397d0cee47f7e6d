"""The ``brainsurgeon`` command line. Each command module registers its commands on ``app``."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="brainsurgeon",
    help="Prune PyTorch networks by the curvature of the loss or by classic criteria.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, each adding its commands to `app` when imported.
COMMAND_MODULES = ("brainsurgeon.cli.core", "brainsurgeon.cli.export", "brainsurgeon.cli.pipeline")


def main() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a missing dependency inside a command module is a real error
                raise
    app()
