-- 0006_unique_key_names: a key's name is unique within its tenant, among keys not revoked.
--
-- A revoked key is final and keeps its name, so the name can be given to its replacement
-- (rotation: revoke `ci`, create `ci`). Databases from before this migration may already hold
-- duplicates: the oldest key of each (tenant, name) keeps the name, every later one is renamed
-- to `<name> #<id>` (ids are unique, so the new names are too, unless a key was already given
-- exactly such a name by hand: then this migration fails and changes nothing, rename by hand).
-- Renaming does not touch authentication (keys are found by prefix), so the revocation epoch
-- is left alone.

UPDATE api_keys
SET name = name || ' #' || CAST(id AS TEXT)
WHERE status <> 'revoked'
  AND EXISTS (
    SELECT 1 FROM api_keys AS older
    WHERE older.tenant_id = api_keys.tenant_id
      AND older.name = api_keys.name
      AND older.status <> 'revoked'
      AND older.id < api_keys.id
  );

CREATE UNIQUE INDEX api_keys_tenant_name ON api_keys (tenant_id, name) WHERE status <> 'revoked';
