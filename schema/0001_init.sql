-- 0001_init: tenants, API keys, the revocation epoch, the usage ledger.
--
-- One file for both dialects. Three placeholders are substituted before it runs (schema/README.md):
--   {{ID}}         an auto-assigned 64-bit primary key
--   {{TIMESTAMP}}  a UTC instant (PostgreSQL timestamptz; SQLite ISO-8601 text, always +00:00)
--   {{DATE}}       a calendar day (PostgreSQL date; SQLite 'YYYY-MM-DD' text)
-- Limits and budgets are plain nullable columns (NULL: not set here, inherit); allowed_models is
-- a JSON array of glob patterns (empty: every model).

CREATE TABLE tenants (
    id                  {{ID}},
    name                TEXT NOT NULL UNIQUE,
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    requests_per_minute BIGINT CHECK (requests_per_minute >= 0),
    tokens_per_minute   BIGINT CHECK (tokens_per_minute >= 0),
    concurrent_requests BIGINT CHECK (concurrent_requests >= 0),
    daily_tokens        BIGINT CHECK (daily_tokens >= 0),
    monthly_tokens      BIGINT CHECK (monthly_tokens >= 0),
    lifetime_tokens     BIGINT CHECK (lifetime_tokens >= 0),
    allowed_models      TEXT NOT NULL DEFAULT '[]',
    created_at          {{TIMESTAMP}} NOT NULL,
    updated_at          {{TIMESTAMP}} NOT NULL
);

CREATE TABLE api_keys (
    id                  {{ID}},
    tenant_id           BIGINT NOT NULL REFERENCES tenants (id),
    name                TEXT NOT NULL,
    prefix              TEXT NOT NULL UNIQUE,
    key_hash            TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'disabled', 'revoked')),
    requests_per_minute BIGINT CHECK (requests_per_minute >= 0),
    tokens_per_minute   BIGINT CHECK (tokens_per_minute >= 0),
    concurrent_requests BIGINT CHECK (concurrent_requests >= 0),
    daily_tokens        BIGINT CHECK (daily_tokens >= 0),
    monthly_tokens      BIGINT CHECK (monthly_tokens >= 0),
    lifetime_tokens     BIGINT CHECK (lifetime_tokens >= 0),
    allowed_models      TEXT NOT NULL DEFAULT '[]',
    log_prompts         BOOLEAN NOT NULL DEFAULT FALSE,
    prompt_ttl_seconds  BIGINT CHECK (prompt_ttl_seconds > 0),
    created_at          {{TIMESTAMP}} NOT NULL,
    updated_at          {{TIMESTAMP}} NOT NULL,
    last_used_at        {{TIMESTAMP}},
    expires_at          {{TIMESTAMP}},
    revoked_at          {{TIMESTAMP}}
);

CREATE INDEX api_keys_tenant_id ON api_keys (tenant_id);

-- One row. Every change to a tenant or a key adds 1 in the same transaction; every gateway
-- process reads it every NZGW_REVOCATION_POLL_INTERVAL and drops its key cache when it moved.
CREATE TABLE revocation_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);

INSERT INTO revocation_epoch (id, epoch) VALUES (1, 0);

-- Settled usage, added per (day, tenant, key, model) with INSERT … ON CONFLICT DO UPDATE.
-- `day` is the calendar day in NZGW_BUDGET_TIMEZONE. The durable truth for budgets.
CREATE TABLE usage_ledger (
    day               {{DATE}} NOT NULL,
    tenant_id         BIGINT NOT NULL REFERENCES tenants (id),
    key_id            BIGINT NOT NULL REFERENCES api_keys (id),
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    refusals          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant_id, key_id, model)
);

CREATE INDEX usage_ledger_tenant_day ON usage_ledger (tenant_id, day);
