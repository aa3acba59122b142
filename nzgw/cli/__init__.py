"""`bin/nzgw`: the operator tool. Every command hangs off `main`.

Commands are imported when they are run, not when the tool starts: `serve` pulls in Quart,
hypercorn and coredis, and a `list-keys` should not pay for that. To add a command, add its
name and "module:function" to `COMMANDS`.
"""

from __future__ import annotations

import importlib

import click

from nzgw import __version__

# name: ("module:function", the one-line help shown by `nzgw --help` without importing it)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("nzgw.cli.serve:serve", "Run the gateway (production)."),
    "dev": ("nzgw.cli.serve:dev", "Run the gateway on its embedded default, for development."),
    "emulate-ollama": ("nzgw.cli.emulate:emulate_ollama", "Run the built-in Ollama emulator."),
    "migrate": ("nzgw.cli.admin:migrate", "Apply pending schema migrations."),
    "create-tenant": ("nzgw.cli.admin:create_tenant", "Create a tenant."),
    "list-tenants": ("nzgw.cli.admin:list_tenants", "List tenants."),
    "update-tenant": ("nzgw.cli.admin:update_tenant", "Change a tenant's limits, budgets, models."),
    "disable-tenant": ("nzgw.cli.admin:disable_tenant", "Disable a tenant and all its keys."),
    "enable-tenant": ("nzgw.cli.admin:enable_tenant", "Enable a disabled tenant."),
    "create-key": ("nzgw.cli.admin:create_key", "Create an API key (shown once)."),
    "list-keys": ("nzgw.cli.admin:list_keys", "List API keys (never the secret)."),
    "update-key": ("nzgw.cli.admin:update_key", "Change a key's limits, budgets, models."),
    "revoke-key": ("nzgw.cli.admin:revoke_key", "Revoke a key (final, within a second)."),
    "probe-ollama": ("nzgw.cli.backends:probe_ollama", "Check every configured backend."),
    "list-models": ("nzgw.cli.backends:list_models", "List models by backend, then the union."),
    "audit": ("nzgw.cli.audit:audit", "Show audit rows (newest first); `audit verify`."),
    "usage": ("nzgw.cli.audit:usage", "Requests, tokens and refusals per day, month or model."),
    "prompts": ("nzgw.cli.audit:prompts", "Show or purge prompt logs of opted-in keys."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = entry[0].partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nzgw")
def main() -> None:
    """nzgw: secure multi-tenant gateway in front of Ollama."""
