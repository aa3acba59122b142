"""Issuing API keys: generate, hash (Argon2id, in a worker thread), store. Used by the CLI,
`nzgw dev` and the tests, so there is one way a key comes into being."""

from __future__ import annotations

import attrs
import trio

from nzgw.core.keys import generate_key
from nzgw.core.models import ApiKey
from nzgw.ports import NewKey, Store
from nzgw.services.identity import KeyHasher


async def issue_key(store: Store, hasher: KeyHasher, template: NewKey) -> tuple[str, ApiKey]:
    """Create a key like `template` (its prefix and hash are replaced). Returns the full key,
    which exists nowhere else: show it once."""
    full_key, prefix = generate_key()
    key_hash = await trio.to_thread.run_sync(hasher.hash, full_key)
    key = await store.create_key(attrs.evolve(template, prefix=prefix, key_hash=key_hash))
    return full_key, key
