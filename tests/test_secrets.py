"""Secrets are never echoed: configuration errors and log lines redact URL userinfo, tokens and
API key secrets (issue #14, finding 4). Every setting is swept with values that carry a secret."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from nzgw.config import SETTINGS, ConfigError, config_from_values
from nzgw.core.redact import redact
from nzgw.logs import JsonFormatter, TextFormatter

SECRET = "S3cretValue9"

# Values that are invalid for most settings and each carry SECRET somewhere.
HOSTILE = [
    f"redis://:{SECRET}@",
    f"redis://user:{SECRET}@",
    f"rediss://{SECRET}@host:notaport/0",
    f"postgresql://app:{SECRET}@/nohost",
    f"mysql://app:{SECRET}@db/x",
    f"ftp://u:{SECRET}@host",
    f"http://u:{SECRET}@",
    f"http://h/?token={SECRET}",
    f'[{{"name":"a","url":"gopher://u:{SECRET}@h","auth_token":"{SECRET}"}}]',
    f'[{{"name":"a","url":"http://u:{SECRET}@h"}},{{"name":"a","url":"http://x"}}]',
    f'[{{"name":"a","url":"http://x","auth_token":"{SECRET}"}},{{"name":"a","url":"http://x"}}]',
]

# A setting whose name says it holds a credential or a URL must be marked secret.
CREDENTIAL_SUFFIXES = ("_URL", "_TOKEN", "_BACKENDS", "_PASSWORD", "_SECRET")


def test_every_setting_that_can_hold_a_secret_is_marked() -> None:
    secret = {s.env for s in SETTINGS if s.secret}
    expected = {s.env for s in SETTINGS if s.env.endswith(CREDENTIAL_SUFFIXES)}
    assert expected <= secret
    assert {"REDIS_URL", "DATABASE_URL", "OLLAMA_BACKENDS", "OLLAMA_AUTH_TOKEN"} <= secret


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_no_setting_echoes_a_secret_in_its_error(setting: object) -> None:
    env = getattr(setting, "env")  # noqa: B009 (parametrised as object for the ids)
    refused = 0
    for value in HOSTILE:
        try:
            config_from_values({env: value})
        except ConfigError as exc:
            refused += 1
            message = str(exc)
            assert message.startswith(f"{env}: ") or message.startswith("NZGW_WORKERS: ")
            assert SECRET not in message, message
    if env.endswith(("_URL", "_BACKENDS")):
        assert refused > 0  # the sweep really exercised its error path


def test_secret_setting_value_is_not_shown_even_without_url_syntax() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_values({"OLLAMA_BASE_URL": SECRET})
    assert SECRET not in str(info.value) and "OLLAMA_BASE_URL" in str(info.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"redis://:{SECRET}@h:6379/0", "redis://***@h:6379/0"),
        (f"postgresql://app:{SECRET}@db/nzgw", "postgresql://app:***@db/nzgw"),
        (f"redis://:p@ss{SECRET}@h", "redis://***@h"),
        (f"http://h/x?a=1&token={SECRET}&b=2", "http://h/x?a=1&token=***&b=2"),
        (f"host=db password={SECRET} dbname=x", "host=db password=*** dbname=x"),
        (f'{{"auth_token": "{SECRET}"}}', '{"auth_token": "***"}'),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer ***"),
        ("nz_abcd1234" + "a" * 40, "nz_abcd1234***"),
        ("http://10.0.0.1:11434/api/tags", "http://10.0.0.1:11434/api/tags"),
        ("key_prefix=nz_abcd1234 tokens=12", "key_prefix=nz_abcd1234 tokens=12"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert redact(redact(text)) == shown


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_log_lines_are_redacted(formatter: logging.Formatter) -> None:
    try:
        raise ConnectionError(f"cannot connect to redis://:{SECRET}@10.0.0.5:6379")
    except ConnectionError:
        record = logging.LogRecord(
            "nzgw.test", logging.WARNING, __file__, 1, "store down", None, sys.exc_info()
        )
    record.url = f"postgresql://app:{SECRET}@db/nzgw"
    record.header = f"Bearer {SECRET}"
    line = formatter.format(record)
    assert SECRET not in line
    assert "10.0.0.5:6379" in line  # the rest stays useful
    if isinstance(formatter, JsonFormatter):
        json.loads(line)
