"""Configuration: precedence, defaults, and a one-line error naming the variable for every
invalid value (the CLI turns it into exit status 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nzgw.config import SETTINGS, BackendConfig, ConfigError, load_config
from tests.process_log import run_nzgw

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_give_an_embedded_single_backend_gateway(tmp_path: Path) -> None:
    config = load_config({}, cwd=tmp_path)
    assert config.database_url == "sqlite:///./var/nzgw.db"
    assert config.embedded_counters
    assert config.effective_backends == (BackendConfig("default", "http://127.0.0.1:11434"),)


def test_backends_list_keeps_priority_order(tmp_path: Path) -> None:
    env = {
        "OLLAMA_BACKENDS": '[{"name":"a","url":"http://h1:11434/"},'
        '{"name":"b","url":"https://h2","auth_token":"t"}]'
    }
    config = load_config(env, cwd=tmp_path)
    assert config.effective_backends == (
        BackendConfig("a", "http://h1:11434"),
        BackendConfig("b", "https://h2", "t"),
    )


def test_precedence_env_over_dotenv_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "nzgw.toml"
    toml.write_text(
        'NZGW_BIND = "0.0.0.0:1"\nNZGW_WORKERS = 3\nREDIS_URL = "redis://r:6379"\n'
        'nzgw_log_format = "json"\n'
    )
    (tmp_path / ".env").write_text("# comment\nexport NZGW_BIND='0.0.0.0:2'\nNZGW_WORKERS=4\n")
    config = load_config({"NZGW_CONFIG": str(toml), "NZGW_WORKERS": "5"}, cwd=tmp_path)
    assert config.bind == "0.0.0.0:2"  # .env beats TOML
    assert config.workers == 5  # environment beats .env
    assert config.log_format == "json"  # TOML beats the default, keys case-insensitive


def test_the_example_toml_file_loads() -> None:
    config = load_config(
        {"NZGW_CONFIG": str(ROOT / "conf" / "nzgw.example.toml")}, cwd=ROOT / "conf"
    )
    assert [b.name for b in config.effective_backends] == ["gpu-a", "gpu-b"]
    assert config.workers == 2 and config.trusted_proxies == ("172.30.0.10",)


INVALID = [
    ("OLLAMA_BASE_URL", "ftp://x"),
    ("OLLAMA_BASE_URL", "not a url"),
    ("OLLAMA_BACKENDS", "[{"),
    ("OLLAMA_BACKENDS", '{"name":"a"}'),
    ("OLLAMA_BACKENDS", '[{"name":"a","url":"gopher://x"}]'),
    ("OLLAMA_BACKENDS", '[{"url":"http://x"}]'),
    ("OLLAMA_BACKENDS", '[{"name":"a","url":"http://x"},{"name":"a","url":"http://y"}]'),
    ("DATABASE_URL", "mysql://x/y"),
    ("DATABASE_URL", "sqlite://relative.db"),
    ("DATABASE_URL", "postgresql:///nohost"),
    ("REDIS_URL", "http://x"),
    ("NZGW_BIND", "8080"),
    ("NZGW_BIND", "host:99999"),
    ("NZGW_WORKERS", "0"),
    ("NZGW_WORKERS", "two"),
    ("NZGW_GRACEFUL_TIMEOUT", "-1"),
    ("NZGW_GRACEFUL_TIMEOUT", "nan"),
    ("NZGW_MIGRATE_ON_START", "maybe"),
    ("NZGW_BUDGET_TIMEZONE", "Mars/Olympus"),
    ("NZGW_LOG_FORMAT", "xml"),
    ("NZGW_METRICS_BIND", "nope"),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({name: value}, cwd=tmp_path)
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message


def test_embedded_counters_refuse_several_workers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^NZGW_WORKERS: .*REDIS_URL"):
        load_config({"NZGW_WORKERS": "2"}, cwd=tmp_path)
    assert load_config({"NZGW_WORKERS": "2", "REDIS_URL": "redis://r"}, cwd=tmp_path).workers == 2


def test_unknown_toml_key_and_bad_toml_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("NZGW_BINDD = '1'\n")
    with pytest.raises(ConfigError, match=r"^NZGW_CONFIG: .*unknown setting"):
        load_config({"NZGW_CONFIG": str(bad)}, cwd=tmp_path)
    bad.write_text("this is not toml")
    with pytest.raises(ConfigError, match=r"^NZGW_CONFIG: "):
        load_config({"NZGW_CONFIG": str(bad)}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("name", "value"),
    [INVALID[0], INVALID[2], ("NZGW_WORKERS", "2"), ("REDIS_URL", "redis://:S3cret@")],
)
def test_serve_exits_2_with_one_line(tmp_path: Path, name: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", name: value}
    result = run_nzgw(["serve"], env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {name}: "), result.stderr
    assert "S3cret" not in result.stdout + result.stderr  # issue #14: secrets never echoed


def test_env_example_documents_every_variable_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    assigned = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", text, re.M))
    assert assigned == {s.env: s.default for s in SETTINGS}


def test_readme_configuration_table_lists_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_backend_slots_and_priorities(tmp_path: Path) -> None:
    raw = (
        '[{"name":"a","url":"http://h1:11434","parallel":4,"priority":0},'
        '{"name":"b","url":"http://h2:11434","priority":0},{"name":"c","url":"http://h3:11434"}]'
    )
    config = load_config({"OLLAMA_BACKENDS": raw}, cwd=tmp_path)
    assert [(b.parallel, b.priority) for b in config.effective_backends] == [
        (4, 0),
        (1, 0),
        (1, None),
    ]
    assert config.queue_timeout == 60 and config.queue_per_tenant == 512
    assert config.queue_wait_header is True
    for bad in ('"parallel":0', '"parallel":true', '"parallel":"2"', '"priority":-1'):
        with pytest.raises(ConfigError, match=r"^OLLAMA_BACKENDS: item 0: '(parallel|priority)'"):
            load_config(
                {"OLLAMA_BACKENDS": f'[{{"name":"a","url":"http://h:1",{bad}}}]'}, cwd=tmp_path
            )


def test_the_default_backend_takes_its_slots_from_ollama_parallel(tmp_path: Path) -> None:
    config = load_config({"OLLAMA_PARALLEL": "4"}, cwd=tmp_path)
    assert [(b.name, b.parallel) for b in config.effective_backends] == [("default", 4)]
    with pytest.raises(ConfigError, match=r"^OLLAMA_PARALLEL: "):
        load_config({"OLLAMA_PARALLEL": "0"}, cwd=tmp_path)
