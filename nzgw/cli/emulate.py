"""`bin/nzgw emulate-ollama`: serve the Ollama emulator by hand (load tests, manual poking)."""

from __future__ import annotations

import signal
from functools import partial

import click
import trio

from nzgw.testing import EmulatorSettings, default_models, model_named, serve_emulator


def settings_from_options(
    *,
    tokens: int,
    token_delay: float,
    first_token_delay: float,
    models: str | None,
    parallel: int = 0,
) -> EmulatorSettings:
    names = [name.strip() for name in (models or "").split(",") if name.strip()]
    return EmulatorSettings(
        models=[model_named(name) for name in names] if names else default_models(),
        tokens_per_reply=tokens,
        token_delay=token_delay,
        first_token_delay=first_token_delay,
        num_parallel=parallel,
    )


async def _serve_until_signalled(settings: EmulatorSettings, host: str, port: int) -> None:
    # SIGINT alone is not enough: shells start background jobs with SIGINT ignored.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            emulator = await nursery.start(partial(serve_emulator, settings, host=host, port=port))
            names = ", ".join(model.name for model in settings.models)
            click.echo(f"emulating Ollama {settings.version} at {emulator.url} ({names})", err=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@click.command("emulate-ollama")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=11434, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--tokens",
    default=8,
    show_default=True,
    type=click.IntRange(min=0),
    help="Content tokens per reply.",
)
@click.option(
    "--token-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between tokens.",
)
@click.option(
    "--first-token-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds before the first token.",
)
@click.option(
    "--parallel",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Generations at once, like OLLAMA_NUM_PARALLEL; more wait first come, first served "
    "(0: unlimited).",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated model names (default: llama3, qwen3, all-minilm).",
)
def emulate_ollama(
    host: str,
    port: int,
    tokens: int,
    token_delay: float,
    first_token_delay: float,
    models: str | None,
    parallel: int,
) -> None:
    """Serve a deterministic emulated Ollama (native, OpenAI and Anthropic APIs)."""
    settings = settings_from_options(
        tokens=tokens,
        token_delay=token_delay,
        first_token_delay=first_token_delay,
        models=models,
        parallel=parallel,
    )
    trio.run(_serve_until_signalled, settings, host, port)
