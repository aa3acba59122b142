-- 0002_audit: the audit log (hash-chained per gateway process), chain heads, prompt logs.
--
-- Written only by the gateway's audit flusher, in batches: audit rows and their prompt logs and
-- the new chain head in one transaction. Rows are never updated; `nzgw audit verify` recomputes
-- the chain (nzgw/core/audit.py explains the scheme and what it detects).
-- No foreign keys to tenants or keys: an audit row must be writable whatever happened to them,
-- and refused requests (unknown key, no key) have neither.

CREATE TABLE audit_log (
    chain_id          TEXT NOT NULL,
    seq               BIGINT NOT NULL CHECK (seq > 0),
    ts                {{TIMESTAMP}} NOT NULL,
    day               {{DATE}} NOT NULL,
    request_id        TEXT NOT NULL,
    tenant_id         BIGINT,
    key_id            BIGINT,
    key_prefix        TEXT,
    client            TEXT NOT NULL,
    method            TEXT NOT NULL,
    surface           TEXT NOT NULL,
    path              TEXT NOT NULL,
    model             TEXT,
    status            INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    refusal           TEXT,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    tokens_reported   BOOLEAN NOT NULL,
    streamed          BOOLEAN NOT NULL,
    ttfb_us           BIGINT,
    latency_us        BIGINT NOT NULL,
    backend           TEXT,
    prompt_logged     BOOLEAN NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 1,
    note              TEXT,
    prev_hash         TEXT NOT NULL,
    hash              TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq)
);

CREATE INDEX audit_log_ts ON audit_log (ts);
CREATE INDEX audit_log_tenant_ts ON audit_log (tenant_id, ts);
CREATE INDEX audit_log_key_prefix_ts ON audit_log (key_prefix, ts);
CREATE INDEX audit_log_request_id ON audit_log (request_id);
-- The refusal counts of `nzgw usage`.
CREATE INDEX audit_log_refused ON audit_log (tenant_id, day) WHERE outcome = 'refused';

-- One row per chain, moved forward with every batch (same transaction): the last seq and hash.
-- `verify` compares the stored rows with it, which is how a deleted tail is noticed.
CREATE TABLE audit_chains (
    chain_id   TEXT PRIMARY KEY,
    started_at {{TIMESTAMP}} NOT NULL,
    head_seq   BIGINT NOT NULL CHECK (head_seq > 0),
    head_hash  TEXT NOT NULL,
    updated_at {{TIMESTAMP}} NOT NULL
);

-- Request and response bodies of keys created with --log-prompts, deleted after expires_at by
-- the purge task (NULL: the key has no TTL). Linked to the audit row by (chain_id, seq).
CREATE TABLE prompt_logs (
    id            {{ID}},
    chain_id      TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    request_id    TEXT NOT NULL,
    tenant_id     BIGINT NOT NULL,
    key_id        BIGINT NOT NULL,
    created_at    {{TIMESTAMP}} NOT NULL,
    expires_at    {{TIMESTAMP}},
    request_body  TEXT NOT NULL,
    response_text TEXT,
    UNIQUE (chain_id, seq),
    FOREIGN KEY (chain_id, seq) REFERENCES audit_log (chain_id, seq)
);

CREATE INDEX prompt_logs_request_id ON prompt_logs (request_id);
CREATE INDEX prompt_logs_expires_at ON prompt_logs (expires_at) WHERE expires_at IS NOT NULL;
