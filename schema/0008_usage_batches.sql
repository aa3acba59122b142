-- Issue #13: the usage batches already added to the ledger, by id. A batch written again (a
-- retried flush whose first outcome was unknown, a local spool replayed at the next start) is
-- added once. Ids older than the retention (nzgw/adapters/sql.py, USAGE_BATCH_RETENTION) are
-- deleted by the flushes themselves.
CREATE TABLE usage_batches (
    batch_id   TEXT PRIMARY KEY,
    applied_at {{TIMESTAMP}} NOT NULL
);
CREATE INDEX usage_batches_applied_at ON usage_batches (applied_at);
