"""Operator commands for the schema, tenants and keys. Each takes `--json` for scripts.

    nzgw migrate
    nzgw create-tenant --name acme --rpm 600 --daily-tokens 2_000_000 --models 'llama3*,qwen3'
    nzgw list-tenants
    nzgw update-tenant acme --tpm 100000 --daily-tokens none
    nzgw disable-tenant acme / enable-tenant acme
    nzgw create-key --tenant acme --name ci --rpm 60 --expires 30d --log-prompts --prompt-ttl 7d
    nzgw list-keys [--tenant acme]
    nzgw update-key --prefix nz_k3x9a2mq --rpm none --expires never
    nzgw revoke-key --prefix nz_k3x9a2mq

Numbers accept `_` separators; on update, `none` unsets a limit (the key then inherits its
tenant's). The full key is printed once, by `create-key`, and never stored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from nzgw.cli._common import (
    CliError,
    CliInputError,
    echo_json,
    echo_table,
    key_json,
    load_config_or_exit,
    run_with_store,
    tenant_json,
    to_json,
)
from nzgw.core.effective import LIMIT_FIELDS, effective
from nzgw.core.keys import is_prefix, parse_duration, parse_expiry, parse_key
from nzgw.core.models import ApiKey, Budgets, Limits, Status, Tenant
from nzgw.core.names import InvalidModelNameError, ModelPatterns
from nzgw.ports import (
    ConflictError,
    KeyChanges,
    KeyNameTakenError,
    NewKey,
    NotFoundError,
    Store,
    TenantChanges,
    utc_now,
)
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key

F = TypeVar("F", bound=Callable[..., Any])
V = TypeVar("V")

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
KEY_NAME_MAX = 200
PREFIX_ATTEMPTS = 5


class _Clear:
    """`none` given on update: unset the value."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR = _Clear()
Count = int | _Clear | None


# --- parameter types: errors are one line, exit status 2 ------------------------------------------


def _bad(param: click.Parameter | None, message: str) -> CliInputError:
    name = param.opts[0] if param is not None and param.opts else "value"
    return CliInputError(f"{name}: {message}")


class _Clearable(click.ParamType[V | _Clear]):
    """An option value; with `clearable`, one of `clear_words` means unset. Subclasses parse."""

    value_type: type[V]
    clear_words = frozenset({"none"})

    def __init__(self, *, clearable: bool) -> None:
        self.clearable = clearable

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> V | _Clear:
        if isinstance(value, self.value_type | _Clear):
            return value
        text = str(value).strip()
        if self.clearable and text.lower() in self.clear_words:
            return CLEAR
        return self.parse(text, value, param)

    def parse(self, text: str, value: Any, param: click.Parameter | None) -> V:
        raise NotImplementedError


class CountType(_Clearable[int]):
    """A whole number >= 0 (`1_000` allowed); with `clearable`, `none` means unset."""

    name = "integer"
    value_type = int

    def parse(self, text: str, value: Any, param: click.Parameter | None) -> int:
        if not re.fullmatch(r"\d[\d_]*", text):
            raise _bad(param, f"expected a whole number >= 0, got {value!r}")
        number = int(text.replace("_", ""))
        if number >= 2**63:
            raise _bad(param, f"too large: {value!r}")
        return number


class DurationType(_Clearable[int]):
    """`7d`, `12h`, `30m`, `90s` → seconds; with `clearable`, `none` means unset."""

    name = "duration"
    value_type = int

    def parse(self, text: str, value: Any, param: click.Parameter | None) -> int:
        try:
            return int(parse_duration(text).total_seconds())
        except ValueError as exc:
            raise _bad(param, str(exc)) from None


class ExpiryType(_Clearable[datetime]):
    """A duration from now (`30d`) or an ISO date / date-time; `never` unsets (update)."""

    name = "expiry"
    value_type = datetime
    clear_words = frozenset({"never", "none"})

    def parse(self, text: str, value: Any, param: click.Parameter | None) -> datetime:
        try:
            return parse_expiry(text, utc_now())
        except ValueError as exc:
            raise _bad(param, str(exc)) from None


class ModelsType(click.ParamType[tuple[str, ...]]):
    """Comma-separated model patterns (`llama3*,qwen3`); `all` or empty: every model."""

    name = "patterns"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text.lower() in {"", "all"}:
            return ()
        patterns = tuple(p.strip() for p in text.split(",") if p.strip())
        try:
            ModelPatterns(patterns)
        except InvalidModelNameError as exc:
            raise _bad(param, str(exc)) from None
        return patterns


class PrefixType(click.ParamType[str]):
    """A key prefix (`nz_` + 8 characters) or a whole key (reduced to its prefix)."""

    name = "prefix"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if is_prefix(text):
            return text
        parsed = parse_key(text)
        if parsed is not None:
            return parsed.prefix
        raise _bad(param, f"expected a key prefix like nz_k3x9a2mq, got {value!r}")


def _tenant_name(value: str) -> str:
    if TENANT_NAME.fullmatch(value) is None:
        raise CliInputError(
            f"invalid tenant name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _key_name(value: str) -> str:
    if not value.strip() or len(value) > KEY_NAME_MAX or not value.isprintable():
        raise CliInputError(f"invalid key name {value!r}")
    return value


# --- shared options -------------------------------------------------------------------------------


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def _limit_options(*, clearable: bool) -> Callable[[F], F]:
    none = " ('none' unsets it)" if clearable else ""

    def decorate(f: F) -> F:
        count = CountType(clearable=clearable)
        options = [
            click.option("--rpm", type=count, help=f"Requests per minute{none}."),
            click.option("--tpm", type=count, help=f"Tokens per minute{none}."),
            click.option("--concurrency", type=count, help=f"Concurrent requests{none}."),
            click.option("--daily-tokens", type=count, help=f"Token budget per day{none}."),
            click.option("--monthly-tokens", type=count, help=f"Token budget per month{none}."),
            click.option("--lifetime-tokens", type=count, help=f"Token budget, ever{none}."),
            click.option(
                "--models",
                type=ModelsType(),
                help="Allowed model patterns: 'llama3*,qwen3'; 'all': every model.",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


_NO_LIMITS = Limits()
_NO_BUDGETS = Budgets()


def _pick(value: Count, current: int | None) -> int | None:
    if value is None:
        return current
    return None if isinstance(value, _Clear) else value


def _limits(opts: dict[str, Any], current: Limits = _NO_LIMITS) -> Limits:
    return Limits(
        requests_per_minute=_pick(opts["rpm"], current.requests_per_minute),
        tokens_per_minute=_pick(opts["tpm"], current.tokens_per_minute),
        concurrent_requests=_pick(opts["concurrency"], current.concurrent_requests),
    )


def _budgets(opts: dict[str, Any], current: Budgets = _NO_BUDGETS) -> Budgets:
    return Budgets(
        daily_tokens=_pick(opts["daily_tokens"], current.daily_tokens),
        monthly_tokens=_pick(opts["monthly_tokens"], current.monthly_tokens),
        lifetime_tokens=_pick(opts["lifetime_tokens"], current.lifetime_tokens),
    )


def _changed_limits(opts: dict[str, Any], current: Limits) -> Limits | None:
    if all(opts[o] is None for o in ("rpm", "tpm", "concurrency")):
        return None
    return _limits(opts, current)


def _changed_budgets(opts: dict[str, Any], current: Budgets) -> Budgets | None:
    if all(opts[o] is None for o in ("daily_tokens", "monthly_tokens", "lifetime_tokens")):
        return None
    return _budgets(opts, current)


async def _get_tenant(store: Store, name: str) -> Tenant:
    try:
        return await store.get_tenant(name)
    except NotFoundError:
        raise CliError(f"unknown tenant {name!r}") from None


async def _get_key(store: Store, prefix: str) -> ApiKey:
    principal = await store.find_key(prefix)
    if principal is None:
        raise CliError(f"unknown key {prefix}")
    return principal.key


# --- output ---------------------------------------------------------------------------------------

_TENANT_HEADERS = ("ID", "NAME", "STATUS", "RPM", "TPM", "CONC", "DAILY", "MONTHLY", "LIFETIME")
_KEY_HEADERS = ("PREFIX", "TENANT", "NAME", "STATUS", "RPM", "TPM", "CONC", "DAILY", "MONTHLY")


def _tenant_row(t: Tenant) -> list[Any]:
    return [
        t.id,
        t.name,
        t.status.value,
        t.limits.requests_per_minute,
        t.limits.tokens_per_minute,
        t.limits.concurrent_requests,
        t.budgets.daily_tokens,
        t.budgets.monthly_tokens,
        t.budgets.lifetime_tokens,
        t.weight,
        t.allowed_models,
        "allowed" if t.allow_model_controls else "stripped",
        t.created_at,
    ]


def _key_row(k: ApiKey, tenant: Tenant, now: datetime) -> list[Any]:
    """The EFFECTIVE values (key and tenant together), each labelled with its source."""
    applies = effective(k, tenant, now)
    return [
        k.prefix,
        tenant.name,
        k.name,
        applies.status.label(),
        *(applies.limits[name].label() for _, name in LIMIT_FIELDS),
        applies.models_label(),
        _ttl(k.prompt_ttl_seconds) if k.log_prompts else False,
        k.expires_at,
        k.last_used_at,
    ]


def _key_listing_json(k: ApiKey, tenant: Tenant, now: datetime) -> dict[str, Any]:
    """The key's own settings (as stored) and, under `effective`, what applies with its tenant."""
    data = key_json(k, tenant.name)
    applies = effective(k, tenant, now)
    data["effective"] = {
        "status": to_json(applies.status),
        **{name: to_json(value) for name, value in applies.limits.items()},
        "models": {"key": list(applies.key_models), "tenant": list(applies.tenant_models)},
    }
    return data


def _ttl(seconds: int | None) -> str:
    if seconds is None:
        return "yes"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"yes ({seconds // size}{unit})"
    return f"yes ({seconds}s)"


def _echo_tenants(tenants: list[Tenant], as_json: bool) -> None:
    if as_json:
        echo_json([tenant_json(t) for t in tenants])
    else:
        echo_table(
            (*_TENANT_HEADERS, "WEIGHT", "MODELS", "MODEL CONTROLS", "CREATED"),
            [_tenant_row(t) for t in tenants],
        )


def _echo_keys(keys: list[tuple[ApiKey, Tenant]], as_json: bool) -> None:
    now = utc_now()
    if as_json:
        echo_json([_key_listing_json(k, tenant, now) for k, tenant in keys])
    else:
        echo_table(
            (*_KEY_HEADERS, "LIFETIME", "MODELS", "PROMPTS", "EXPIRES", "LAST USED"),
            [_key_row(k, tenant, now) for k, tenant in keys],
        )


# --- commands -------------------------------------------------------------------------------------


@click.command()
@_json_option
def migrate(as_json: bool) -> None:
    """Apply pending schema migrations (safe to run concurrently)."""
    config = load_config_or_exit()
    applied = run_with_store(config, lambda store: store.migrate(), require_schema=False)
    if as_json:
        echo_json({"applied": applied})
    elif applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("the schema is up to date")


class WeightType(click.ParamType[int]):
    """A tenant weight: a whole number from 1 to 1000."""

    name = "weight"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip()
        if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= 1000:
            raise _bad(param, f"expected a whole number from 1 to 1000, got {value!r}")
        return int(text)


_weight_option = click.option(
    "--weight",
    type=WeightType(),
    help="Share of saturated backend slots relative to other tenants (default 1).",
)


_model_controls_option = click.option(
    "--model-controls/--no-model-controls",
    "model_controls",
    default=None,
    help="Let the tenant's requests set keep_alive and load-time options on shared models "
    "(default: stripped).",
)


@click.command("create-tenant")
@click.option("--name", required=True, help="Unique tenant name.")
@_limit_options(clearable=False)
@_model_controls_option
@_weight_option
@_json_option
def create_tenant(
    name: str,
    as_json: bool,
    models: tuple[str, ...] | None,
    model_controls: bool | None,
    weight: int | None,
    **opts: Any,
) -> None:
    """Create a tenant with its limits, budgets and allowed models."""
    config = load_config_or_exit()
    _tenant_name(name)

    async def work(store: Store) -> Tenant:
        try:
            tenant = await store.create_tenant(
                name,
                limits=_limits(opts),
                budgets=_budgets(opts),
                allowed_models=models or (),
                weight=weight or 1,
            )
        except ConflictError:
            raise CliError(f"a tenant named {name!r} exists already") from None
        if model_controls:
            tenant = await store.update_tenant(tenant.id, TenantChanges(allow_model_controls=True))
        return tenant

    _echo_tenants([run_with_store(config, work)], as_json)


@click.command("list-tenants")
@_json_option
def list_tenants(as_json: bool) -> None:
    """List every tenant."""
    config = load_config_or_exit()
    _echo_tenants(run_with_store(config, lambda store: store.list_tenants()), as_json)


@click.command("update-tenant")
@click.argument("name")
@click.option("--rename", help="A new unique name.")
@_limit_options(clearable=True)
@_model_controls_option
@_weight_option
@_json_option
def update_tenant(
    name: str,
    rename: str | None,
    as_json: bool,
    models: tuple[str, ...] | None,
    model_controls: bool | None,
    weight: int | None,
    **opts: Any,
) -> None:
    """Change a tenant's name, limits, budgets or allowed models."""
    config = load_config_or_exit()
    if rename is not None:
        _tenant_name(rename)

    async def work(store: Store) -> Tenant:
        current = await _get_tenant(store, name)
        changes = TenantChanges(
            name=rename,
            limits=_changed_limits(opts, current.limits),
            budgets=_changed_budgets(opts, current.budgets),
            allowed_models=models,
            allow_model_controls=model_controls,
            weight=weight,
        )
        try:
            return await store.update_tenant(current.id, changes)
        except ConflictError:
            raise CliError(f"a tenant named {rename!r} exists already") from None

    _echo_tenants([run_with_store(config, work)], as_json)


def _set_tenant_status(name: str, status: Status, as_json: bool) -> None:
    config = load_config_or_exit()

    async def work(store: Store) -> Tenant:
        current = await _get_tenant(store, name)
        return await store.update_tenant(current.id, TenantChanges(status=status))

    tenant = run_with_store(config, work)
    if as_json:
        echo_json(tenant_json(tenant))
    else:
        click.echo(f"tenant {tenant.name} is {tenant.status.value}")


@click.command("disable-tenant")
@click.argument("name")
@_json_option
def disable_tenant(name: str, as_json: bool) -> None:
    """Refuse every key of a tenant (within a second on every gateway) until enabled again."""
    _set_tenant_status(name, Status.DISABLED, as_json)


@click.command("enable-tenant")
@click.argument("name")
@_json_option
def enable_tenant(name: str, as_json: bool) -> None:
    """Accept a disabled tenant's keys again."""
    _set_tenant_status(name, Status.ACTIVE, as_json)


@click.command("create-key")
@click.option("--tenant", required=True, help="The tenant that owns the key.")
@click.option("--name", required=True, help="A label for the key (who or what uses it).")
@_limit_options(clearable=False)
@click.option("--log-prompts", is_flag=True, help="Store prompts and responses of this key.")
@click.option("--prompt-ttl", type=DurationType(clearable=False), help="Keep them this long (7d).")
@click.option("--expires", type=ExpiryType(clearable=False), help="30d, or a date: 2030-01-31.")
@_json_option
def create_key(
    tenant: str,
    name: str,
    log_prompts: bool,
    prompt_ttl: int | None,
    expires: datetime | None,
    as_json: bool,
    models: tuple[str, ...] | None,
    **opts: Any,
) -> None:
    """Create an API key. The full key is printed this once, and never stored."""
    config = load_config_or_exit()
    _key_name(name)
    hasher = KeyHasher(config.argon2)

    async def work(store: Store) -> tuple[str, ApiKey, Tenant]:
        owner = await _get_tenant(store, tenant)
        template = NewKey(
            tenant_id=owner.id,
            name=name,
            prefix="",  # issue_key generates the key, its prefix and its hash
            key_hash="",
            limits=_limits(opts),
            budgets=_budgets(opts),
            allowed_models=models or (),
            log_prompts=log_prompts,
            prompt_ttl_seconds=prompt_ttl,
            expires_at=expires,
        )
        for _ in range(PREFIX_ATTEMPTS):
            try:
                full_key, key = await issue_key(store, hasher, template)
            except KeyNameTakenError:
                raise CliError(
                    f"a key named {name!r} exists already in tenant {tenant!r}"
                ) from None
            except ConflictError:
                continue  # a prefix collision: 36**8 prefixes, so only by extreme chance
            return full_key, key, owner
        raise CliError("could not find a free key prefix")

    full_key, key, owner = run_with_store(config, work)
    if as_json:
        echo_json({"key": full_key, "prefix": key.prefix})
        return
    click.echo(f"key:     {full_key}")
    click.echo(f"prefix:  {key.prefix}")
    click.echo(f"tenant:  {owner.name}")
    click.echo(f"name:    {key.name}")
    click.echo(f"expires: {key.expires_at.isoformat() if key.expires_at else 'never'}")
    click.echo("Store the key now: it is shown only this once.", err=True)


@click.command("list-keys")
@click.option("--tenant", help="Only this tenant's keys.")
@_json_option
def list_keys(tenant: str | None, as_json: bool) -> None:
    """List keys: prefix, EFFECTIVE status, limits, budgets and models (key and tenant
    together, each with its source), expiry, last use; never a secret or hash."""
    config = load_config_or_exit()

    async def work(store: Store) -> list[tuple[ApiKey, Tenant]]:
        if tenant is not None:
            owner = await _get_tenant(store, tenant)
            return [(k, owner) for k in await store.list_keys(owner.id)]
        tenants = {t.id: t for t in await store.list_tenants()}
        return [(k, tenants[k.tenant_id]) for k in await store.list_keys()]

    _echo_keys(run_with_store(config, work), as_json)


@click.command("update-key")
@click.option("--prefix", required=True, type=PrefixType(), help="The key's prefix (nz_…).")
@click.option("--name", help="A new label.")
@_limit_options(clearable=True)
@click.option("--log-prompts/--no-log-prompts", default=None, help="Store prompts or not.")
@click.option("--prompt-ttl", type=DurationType(clearable=True), help="7d; 'none': no expiry.")
@click.option("--expires", type=ExpiryType(clearable=True), help="30d, a date, or 'never'.")
@click.option("--disable/--enable", "disabled", default=None, help="Suspend or resume the key.")
@_json_option
def update_key(
    prefix: str,
    name: str | None,
    log_prompts: bool | None,
    prompt_ttl: int | _Clear | None,
    expires: datetime | _Clear | None,
    disabled: bool | None,
    as_json: bool,
    models: tuple[str, ...] | None,
    **opts: Any,
) -> None:
    """Change a key's label, limits, budgets, models, prompt logging, expiry or status."""
    config = load_config_or_exit()
    if name is not None:
        _key_name(name)

    async def work(store: Store) -> tuple[ApiKey, Tenant]:
        current = await _get_key(store, prefix)
        changes = KeyChanges(
            name=name,
            status=None if disabled is None else Status.DISABLED if disabled else Status.ACTIVE,
            limits=_changed_limits(opts, current.limits),
            budgets=_changed_budgets(opts, current.budgets),
            allowed_models=models,
            log_prompts=log_prompts,
            prompt_ttl_seconds=prompt_ttl if isinstance(prompt_ttl, int) else None,
            clear_prompt_ttl=isinstance(prompt_ttl, _Clear),
            expires_at=expires if isinstance(expires, datetime) else None,
            clear_expires_at=isinstance(expires, _Clear),
        )
        try:
            key = await store.update_key(prefix, changes)
        except KeyNameTakenError:
            raise CliError(f"another key of its tenant is named {name!r} already") from None
        except ConflictError:
            raise CliError(f"the key {prefix} is revoked: it cannot be changed") from None
        return key, await store.get_tenant(key.tenant_id)

    key, tenant = run_with_store(config, work)
    _echo_keys([(key, tenant)], as_json)


@click.command("revoke-key")
@click.option("--prefix", required=True, type=PrefixType(), help="The key's prefix (nz_…).")
@_json_option
def revoke_key(prefix: str, as_json: bool) -> None:
    """Revoke a key for good: every gateway refuses it within a second."""
    config = load_config_or_exit()

    async def work(store: Store) -> ApiKey:
        try:
            return await store.update_key(prefix, KeyChanges(status=Status.REVOKED))
        except NotFoundError:
            raise CliError(f"unknown key {prefix}") from None

    key = run_with_store(config, work)
    if as_json:
        echo_json(key_json(key))
    else:
        click.echo(f"key {key.prefix} ({key.name}) is revoked")
