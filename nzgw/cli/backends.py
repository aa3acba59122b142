"""`nzgw probe-ollama` and `nzgw list-models`: the operator's view of the configured backends.

Both poll every backend once, in parallel, with the same code discovery uses (`poll_once`),
and exit with status 1 when any backend is down (2 on invalid configuration). Backend names
and URLs are printed here because this is an operator tool; auth tokens and URL credentials
never are.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import trio

from nzgw.adapters.ollama import open_backends
from nzgw.cli._common import load_config_or_exit
from nzgw.config import Config
from nzgw.services.discovery import poll_once
from nzgw.services.registry import BackendState, Registry, Snapshot

_CLI_POOL_SIZE = 4


def _public_url(url: str) -> str:
    """The URL without user:password@ (never print credentials)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _poll(config: Config, poll_timeout: float) -> tuple[Snapshot, dict[str, str]]:
    async with open_backends(
        config.effective_backends,
        pool_size=_CLI_POOL_SIZE,
        connect_timeout=config.upstream_connect_timeout,
    ) as backends:
        snapshot = await poll_once(backends, poll_timeout=poll_timeout)
        return snapshot, {b.name: _public_url(b.url) for b in backends}


class _Named:
    """A registry entry for a snapshot that is only listed, never routed."""

    def __init__(self, name: str) -> None:
        self.name = name


def _union(snapshot: Snapshot) -> list[dict[str, Any]]:
    registry: Registry[Any] = Registry([_Named(s.name) for s in snapshot.backends])
    registry.publish(snapshot)
    return registry.list_models(lambda _name: True)


def _size(value: Any) -> str:
    """Bytes as a short human size (`4.7 GB`); `-` when unknown."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _status(state: BackendState) -> str:
    return "up" if state.healthy else f"DOWN ({state.error}: {state.detail})"


_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds each backend gets to answer.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.command("probe-ollama")
@_timeout_option
@_json_option
def probe_ollama(timeout: float, as_json: bool) -> None:
    """Check every configured backend: reachable, version, model count, latency.

    Exits with status 1 when any backend is down.
    """
    config = load_config_or_exit()
    snapshot, urls = trio.run(_poll, config, timeout)
    rows = [
        {
            "name": s.name,
            "url": urls[s.name],
            "up": s.healthy,
            "version": s.version,
            "models": len(s.models) if s.healthy else None,
            "loaded": len(s.loaded) if s.healthy else None,
            "latency_ms": round(s.latency * 1000, 1) if s.latency is not None else None,
            "error": s.error,
            "detail": s.detail or None,
        }
        for s in snapshot.backends
    ]
    all_up = all(s.healthy for s in snapshot.backends)
    if as_json:
        click.echo(json.dumps({"ok": all_up, "backends": rows}, indent=2))
    else:
        width = max(len(s.name) for s in snapshot.backends)
        for s, row in zip(snapshot.backends, rows, strict=True):
            if s.healthy:
                line = (
                    f"up    version {s.version or '?'}, {len(s.models)} models "
                    f"({len(s.loaded)} loaded), {row['latency_ms']} ms"
                )
            else:
                line = f"DOWN  {s.error}: {s.detail}"
            click.echo(f"{s.name:<{width}}  {row['url']}  {line}")
    if not all_up:
        sys.exit(1)


@click.command("list-models")
@_timeout_option
@_json_option
def list_models(timeout: float, as_json: bool) -> None:
    """List the models of every backend, then the number of distinct models overall.

    The union counts the backends that are up. Exits with status 1 when any backend is down.
    """
    config = load_config_or_exit()
    snapshot, _urls = trio.run(_poll, config, timeout)
    union = _union(snapshot)
    all_up = all(s.healthy for s in snapshot.backends)
    if as_json:
        document = {
            "ok": all_up,
            "backends": [
                {
                    "name": s.name,
                    "up": s.healthy,
                    "error": s.error,
                    "models": [
                        {
                            "name": info.name,
                            "digest": info.digest,
                            "size": info.entry.get("size"),
                            "modified_at": info.entry.get("modified_at"),
                            "loaded": info.name in s.loaded,
                        }
                        for info in s.models.values()
                    ],
                }
                for s in snapshot.backends
            ],
            "union": [entry.get("name") for entry in union],
            "union_count": len(union),
        }
        click.echo(json.dumps(document, indent=2))
    else:
        # One set of column widths for every backend, so the columns line up down the page.
        width = max((len(i.name) for s in snapshot.backends for i in s.models.values()), default=0)
        width = max(width, len("MODEL"))
        for s in snapshot.backends:
            click.echo(f"{s.name}: {_status(s)}")
            if s.models:
                click.echo(f"  {'MODEL':<{width}}  {'DIGEST':<12}  {'SIZE':>9}  LOADED")
            for info in s.models.values():
                loaded = "yes" if info.name in s.loaded else "no"
                size = _size(info.entry.get("size"))
                digest = info.digest[:12] or "-"
                click.echo(f"  {info.name:<{width}}  {digest:<12}  {size:>9}  {loaded}")
        click.echo(f"{len(union)} distinct models on the backends that are up")
    if not all_up:
        sys.exit(1)
