"""Test doubles for nzgw. The Ollama emulator: `open_emulator()` in tests and benchmarks,
`bin/nzgw emulate-ollama` by hand."""

from nzgw.testing._emu_config import (
    EmulatedModel,
    EmulatorSettings,
    Fault,
    default_models,
    model_named,
)
from nzgw.testing.emulator import (
    ConnectionRecord,
    Emulator,
    RequestRecord,
    open_emulator,
    serve_emulator,
)

__all__ = [
    "ConnectionRecord",
    "EmulatedModel",
    "Emulator",
    "EmulatorSettings",
    "Fault",
    "RequestRecord",
    "default_models",
    "model_named",
    "open_emulator",
    "serve_emulator",
]
