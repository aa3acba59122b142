-- 0005_change_feed: what changed, so that each gateway drops only the affected cache entries.
--
-- Every change to a tenant or a key still adds 1 to revocation_epoch.epoch, and now also writes
-- one row here whose seq IS the new epoch, in the same transaction. The epoch row's lock orders
-- those transactions, so seq order is commit order and a reader that sees seq N sees every
-- seq below it: a gateway at position P reads the rows P < seq <= epoch and knows it missed
-- nothing when there are exactly epoch - P of them (otherwise it empties its whole cache).
-- key_id NULL: the tenant itself changed (all its keys). Rows older than the last 10,000 are
-- deleted by the writers.
CREATE TABLE change_feed (
    seq        BIGINT PRIMARY KEY,
    tenant_id  BIGINT NOT NULL,
    key_id     BIGINT,
    changed_at {{TIMESTAMP}} NOT NULL
);
