"""`bin/nzgw`: the operator tool. Every command hangs off `main`."""

from __future__ import annotations

import click

from nzgw import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nzgw")
def main() -> None:
    """nzgw: secure multi-tenant gateway in front of Ollama."""


from nzgw.cli.backends import list_models, probe_ollama  # noqa: E402

main.add_command(probe_ollama)
main.add_command(list_models)

from nzgw.cli.admin import (  # noqa: E402
    create_key,
    create_tenant,
    disable_tenant,
    enable_tenant,
    list_keys,
    list_tenants,
    migrate,
    revoke_key,
    update_key,
    update_tenant,
)

main.add_command(migrate)
main.add_command(create_tenant)
main.add_command(list_tenants)
main.add_command(update_tenant)
main.add_command(disable_tenant)
main.add_command(enable_tenant)
main.add_command(create_key)
main.add_command(list_keys)
main.add_command(update_key)
main.add_command(revoke_key)


from nzgw.cli.emulate import emulate_ollama  # noqa: E402

main.add_command(emulate_ollama)

from nzgw.cli.serve import dev, serve  # noqa: E402

main.add_command(serve)
main.add_command(dev)
