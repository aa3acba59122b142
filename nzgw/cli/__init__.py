"""`bin/nzgw`: the operator tool. Every command hangs off `main`."""

from __future__ import annotations

import click

from nzgw import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nzgw")
def main() -> None:
    """nzgw: secure multi-tenant gateway in front of Ollama."""
