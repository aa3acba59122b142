"""The open-file limit, raised when `serve` and `dev` start.

Every client connection is a socket, and so is every upstream connection: a stream holds two, and
while the relay pump carries it two more (its copies, nzgw/http/pump.py), so 1,000 concurrent
streams need ~4,000 descriptors, plus listeners, pools, the store and logs.
Linux starts processes with a soft limit of 1,024. Past it, `accept` fails with EMFILE; Trio's
accept loop then logs and sleeps 100 ms before it tries again, so new clients wait in the
backlog while the gateway looks healthy. Hence:

- the soft limit is raised to the hard limit (what an unprivileged process may do);
- if even that is below `NZGW_MIN_OPEN_FILES`, start-up stops with one line and exit status 2,
  rather than failing under load. `NZGW_MIN_OPEN_FILES=0` switches the check off.

With `NZGW_WORKERS=N` every worker is its own process with its own limit (inherited from the
supervisor, which raises it first).
"""

from __future__ import annotations

import contextlib
import logging
import resource

import attrs

from nzgw.cli._common import CliInputError

log = logging.getLogger("nzgw.limits")


@attrs.frozen
class OpenFiles:
    """The soft open-file limit before and after, and the hard limit."""

    before: int
    now: int
    hard: int


def wanted_soft_limit(soft: int, hard: int, needed: int) -> int:
    """The soft limit to ask for: the hard limit, or at least `needed` (and never less than
    `soft`) when the hard limit is unlimited (macOS caps the soft limit below that)."""
    if hard == resource.RLIM_INFINITY:
        return soft if soft == resource.RLIM_INFINITY else max(soft, needed)
    return max(soft, hard)


def raise_open_file_limit(needed: int) -> OpenFiles:
    """Raise the soft open-file limit as far as the hard limit allows and log a change.

    Raises `CliInputError` (one line, exit status 2) when the limit stays below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted_soft_limit(soft, hard, needed)
    if target != soft:
        # On failure keep what we have: the check below decides whether that is enough.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if needed > 0 and now != resource.RLIM_INFINITY and now < needed:
        raise CliInputError(
            f"NZGW_MIN_OPEN_FILES: the open-file limit is {now} (hard limit {_show(hard)}), "
            f"below the {needed} this gateway needs (~4 per concurrent stream); raise the hard "
            "limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=) or lower "
            "NZGW_MIN_OPEN_FILES"
        )
    if now != soft:
        log.info("open-file limit raised", extra={"open_files_from": soft, "open_files": now})
    return OpenFiles(before=soft, now=now, hard=hard)


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
