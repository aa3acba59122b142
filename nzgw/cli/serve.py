"""`nzgw serve` (production) and `nzgw dev` (embedded: SQLite, in-process counters, emulator)."""

from __future__ import annotations

import functools
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from nzgw.adapters.stores import open_store
from nzgw.cli._common import load_config_or_exit
from nzgw.cli.workers import current_worker, run_workers
from nzgw.config import SETTINGS, Config
from nzgw.core.keys import parse_key
from nzgw.http.metrics import METRICS
from nzgw.logs import setup_logging
from nzgw.ports import ConflictError, NewKey, NotFoundError, Store
from nzgw.server import Running, run_server
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import EmulatorSettings, open_emulator

DEV_DIR = Path("var")
DEV_KEY_FILE = DEV_DIR / "dev-key"
DEV_TENANT = "dev"


@click.command()
def serve() -> None:
    """Run the gateway (configuration from the environment, .env and NZGW_CONFIG)."""
    config = load_config_or_exit()
    setup_logging(config.log_format, config.log_level)
    worker = current_worker()
    if worker is not None:
        METRICS.set_worker(worker.index)
        config = worker.configure(config)
        trio.run(functools.partial(run_server, shutdown_trigger=worker.shutdown_trigger), config)
    elif config.workers > 1:
        sys.exit(run_workers(config.workers, graceful_timeout=config.graceful_timeout))
    else:
        trio.run(run_server, config)


def _backend_configured(config: Config) -> bool:
    defaults = {s.field: s.default for s in SETTINGS}
    return bool(config.backends) or config.ollama_base_url != defaults["ollama_base_url"]


@click.command()
@click.option(
    "--emulator/--no-emulator",
    default=None,
    help="Run the built-in Ollama emulator (default: when no backend is configured).",
)
def dev(emulator: bool | None) -> None:
    """Run the gateway on its embedded default: SQLite under ./var, in-process counters, and the
    Ollama emulator unless a backend is configured. Creates a `dev` tenant and key on first run."""
    config = load_config_or_exit()
    if emulator is None:
        emulator = not _backend_configured(config)
    setup_logging(config.log_format, config.log_level)
    DEV_DIR.mkdir(exist_ok=True)
    trio.run(_dev_main, config, emulator)


async def _dev_main(config: Config, emulator: bool) -> None:
    config = attrs.evolve(config, migrate_on_start=True)
    # The key exists before the server answers: whoever sees /healthz can read var/dev-key.
    async with open_store(config.database_url) as store:
        await store.migrate()
        key = await _ensure_dev_key(store, config)
    async with trio.open_nursery() as nursery:
        if emulator:
            url = await nursery.start(_run_emulator)
            config = attrs.evolve(config, ollama_base_url=url, backends=())

        async def server(task_status: trio.TaskStatus[Running]) -> None:
            await run_server(config, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained after a signal: the emulator goes too

        running: Running = await nursery.start(server)
        _print_welcome(running.url, key, emulator)


async def _run_emulator(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_emulator(EmulatorSettings(token_delay=0.02)) as emu:
        task_status.started(emu.url)
        await trio.sleep_forever()


async def _ensure_dev_key(store: Store, config: Config) -> str:
    """The dev key from ./var/dev-key if it still works, else a new one (file mode 0600)."""
    key_file = trio.Path(DEV_KEY_FILE)
    if await key_file.exists():
        key = (await key_file.read_text()).strip()
        parsed = parse_key(key)
        if parsed is not None and await store.find_key(parsed.prefix) is not None:
            return key
    try:
        tenant = await store.create_tenant(DEV_TENANT)
    except ConflictError:
        tenant = await store.get_tenant(DEV_TENANT)
    hasher = KeyHasher(config.argon2)
    try:
        key, _ = await issue_key(store, hasher, NewKey(tenant.id, "dev", "", ""))
    except (ConflictError, NotFoundError):  # a key named "dev" exists (revoked, or lost file)
        key, _ = await issue_key(
            store, hasher, NewKey(tenant.id, f"dev-{secrets.token_hex(2)}", "", "")
        )
    await trio.to_thread.run_sync(_write_private, DEV_KEY_FILE, key + "\n")
    return key


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _print_welcome(url: str, key: str, emulator: bool) -> None:
    backend = "the built-in Ollama emulator" if emulator else "the configured Ollama backend(s)"
    examples: dict[str, Any] = {
        "curl": (
            f"curl -s {url}/api/chat -H 'Authorization: Bearer {key}' "
            """-d '{"model":"llama3","messages":[{"role":"user","content":"Hello"}]}'"""
        ),
        "ollama": (
            f"python -c \"import ollama; c = ollama.Client(host='{url}', "
            f"headers={{'Authorization': 'Bearer {key}'}}); "
            "print(c.chat(model='llama3', messages=[{'role':'user','content':'Hello'}])"
            '.message.content)"'
        ),
        "openai": (
            f"python -c \"import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='{key}'); "
            "print(c.chat.completions.create(model='llama3', messages=[{'role':'user',"
            "'content':'Hello'}]).choices[0].message.content)\""
        ),
    }
    lines = [
        "",
        f"nzgw dev is running on {url} in front of {backend}.",
        f"Dev API key (also in {DEV_KEY_FILE}, mode 0600):",
        f"  {key}",
        "",
        "Try it:",
        *(f"  # {name}\n  {command}" for name, command in examples.items()),
        "",
        "Stop with Ctrl-C.",
        "",
    ]
    click.echo("\n".join(lines), err=True)
