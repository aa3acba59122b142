"""`nzgw serve` (production) and `nzgw dev` (embedded: SQLite, in-process counters, emulator)."""

from __future__ import annotations

import functools
import gc
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from nzgw.adapters.stores import open_store
from nzgw.cli._common import CliInputError, load_config_or_exit
from nzgw.cli._rlimit import raise_open_file_limit
from nzgw.cli.schema_check import require_current_schema
from nzgw.cli.workers import current_worker, run_workers
from nzgw.config import SETTINGS, Config
from nzgw.core.keys import parse_key
from nzgw.core.models import Status
from nzgw.http.listen import bind_socket
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
    os.umask(0o077)  # the database, its -wal/-shm and everything else nzgw creates: 0600/0700
    setup_logging(config.log_format, config.log_level)
    raise_open_file_limit(config.min_open_files)
    worker = current_worker()
    if worker is None:  # workers: their supervisor checked
        require_current_schema(config)
    if worker is not None or config.workers <= 1:
        tune_gc()
    if worker is not None:
        config = worker.configure(config)
        trio.run(
            functools.partial(
                run_server, shutdown_trigger=worker.shutdown_trigger, worker=worker.index
            ),
            config,
        )
    elif config.workers > 1:
        sys.exit(run_workers(config.workers, graceful_timeout=config.graceful_timeout))
    else:
        trio.run(run_server, config)


# The oldest generation is collected after this many collections of the middle one (CPython's
# default: 10).
GC_OLDEST_AFTER = 100


def tune_gc() -> None:
    """Keep the cyclic garbage collector's full collections rare in a serving process.

    A full collection holds the GIL for as long as it takes to visit every object: in a
    process carrying 1,000 streams, 100–300 ms (bench/results/pump.md), during which no token
    moves, in the relay pump's thread either. Objects made before serving (modules, the
    configuration) live as long as the process: frozen, a collection never visits them again.
    The oldest generation is collected 10× less often than CPython's default; the young ones
    as usual (they are cheap, and they free what requests leave behind)."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, GC_OLDEST_AFTER)


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
    os.umask(0o077)  # the database, its -wal/-shm, the key file: this user's only
    _check_port_free(config.bind)
    setup_logging(config.log_format, config.log_level)
    raise_open_file_limit(config.min_open_files)
    DEV_DIR.mkdir(mode=0o700, exist_ok=True)
    os.chmod(DEV_DIR, 0o700)  # also when an older nzgw made it 0755: key hashes, audit, prompts
    trio.run(_dev_main, config, emulator)


def _check_port_free(bind: str) -> None:
    """One line and exit status 2 when the listening port is taken (not a traceback)."""
    try:
        bind_socket(bind, stall_timeout=0).close()
    except OSError as exc:
        raise CliInputError(
            f"NZGW_BIND: cannot listen on {bind}: {exc.strerror or exc} "
            "(another nzgw dev? set NZGW_BIND=127.0.0.1:<port>)"
        ) from None


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
    """The dev key from ./var/dev-key if it still works, else a new one (file mode 0600),
    saying why the old one was replaced."""
    key_file = trio.Path(DEV_KEY_FILE)
    hasher = KeyHasher(config.argon2)
    if await key_file.exists():
        key = (await key_file.read_text()).strip()
        problem = await _dev_key_problem(store, hasher, key)
        if problem is None:
            return key
        click.echo(
            f"The dev key in {DEV_KEY_FILE} no longer works ({problem}); issuing a new one.",
            err=True,
        )
    try:
        tenant = await store.create_tenant(DEV_TENANT)
    except ConflictError:
        tenant = await store.get_tenant(DEV_TENANT)
    if tenant.status is not Status.ACTIVE:
        click.echo(
            f"The {DEV_TENANT!r} tenant is {tenant.status.value}: its keys are refused until "
            f"`nzgw update-tenant {DEV_TENANT} --status active`.",
            err=True,
        )
    try:
        key, _ = await issue_key(store, hasher, NewKey(tenant.id, "dev", "", ""))
    except (ConflictError, NotFoundError):  # a key named "dev" exists (revoked, or lost file)
        key, _ = await issue_key(
            store, hasher, NewKey(tenant.id, f"dev-{secrets.token_hex(2)}", "", "")
        )
    await trio.to_thread.run_sync(_write_private, DEV_KEY_FILE, key + "\n")
    return key


async def _dev_key_problem(store: Store, hasher: KeyHasher, key: str) -> str | None:
    """Why `key` would be refused (None: it works)."""
    parsed = parse_key(key)
    if parsed is None:
        return "malformed"
    found = await store.find_key(parsed.prefix)
    if found is None:
        return "unknown to this database"
    if not await trio.to_thread.run_sync(hasher.verify, found.key.key_hash, key):
        return "it does not match"
    if found.key.status is not Status.ACTIVE:
        return found.key.status.value
    if found.key.expires_at is not None and found.key.expires_at <= datetime.now(UTC):
        return "expired"
    return None


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
        "Try it (the Python examples need the client packages: pip install ollama openai):",
        *(f"  # {name}\n  {command}" for name, command in examples.items()),
        "",
        "Stop with Ctrl-C.",
        "",
    ]
    click.echo("\n".join(lines), err=True)
