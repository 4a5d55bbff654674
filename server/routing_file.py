"""The live routing policy: the routing file, re-read when it changes or on SIGHUP.

The parsing is :meth:`RoutingPolicy.from_json` (pure); this module owns the file and the swap.
A file that fails to parse, or names an endpoint the repository lacks, is logged and counted, and
the previous policy stays in force: a typo in a ConfigMap must not take traffic down.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable, Collection

from .metrics import ServerMetrics
from .routing import RoutingPolicy, Target

log = logging.getLogger(__name__)


def _describe(policy: RoutingPolicy) -> str:
    return ", ".join(f"{scale}_{precision.value}={share:.1%}"
                     for (scale, precision), share in sorted(
                         policy.shares().items(), key=lambda kv: (kv[0][0], kv[0][1].value)))


def load_policy(path: Path, default_scale: str, available: Collection[Target]) -> RoutingPolicy:
    """Read and validate a routing file.

    Raises:
        ValueError: unreadable, malformed, or an arm not in ``available``.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read routing file {path}: {exc}") from None
    policy = RoutingPolicy.from_json(text, default_scale)
    missing = policy.missing(available)
    if missing:
        names = ", ".join(f"{s}_{p.value}" for s, p in missing)
        have = ", ".join(sorted(f"{s}_{p.value}" for s, p in available))
        raise ValueError(f"routing file {path} routes to {names}, not in the repository "
                         f"(have: {have})")
    return policy


class RoutingSource:
    """Holds the current policy; :attr:`policy` is what the servicer reads per call.

    Args:
        path: the routing file, or None for a fixed ``default`` policy.
        default: the policy without a file.
        default_scale: scale for file keys that name none.
        available: (scale, precision) pairs the repository can serve.
        metrics: counts reloads.
        on_change: called with each new policy (for tests and logs).
    """

    def __init__(self, path: Path | None, default: RoutingPolicy, default_scale: str,
                 available: Collection[Target], metrics: ServerMetrics,
                 on_change: Callable[[RoutingPolicy], None] | None = None):
        self._path = path
        self._default_scale = default_scale
        self._available = frozenset(available)
        self._metrics = metrics
        self._on_change = on_change
        self._stamp: tuple[int, int] | None = None
        self.policy = default
        if path is not None:
            # At start a bad file is fatal (raise), unlike a bad reload.
            self._stamp = self._file_stamp()
            self.policy = load_policy(path, default_scale, self._available)
        log.info("routing: %s", _describe(self.policy))

    def set_available(self, available: Collection[Target]) -> None:
        """The repository's (scale, precision) pairs changed (an endpoint added or removed
        while serving): re-read the file against them. An arm the current policy still routes
        to but that is gone gets no traffic (routing skips what cannot serve) and is logged."""
        self._available = frozenset(available)
        gone = self.policy.missing(self._available)
        if gone:
            log.warning("routing still names %s, no longer in the repository: its share goes "
                        "to the other arms until the routing file drops it",
                        ", ".join(f"{s}_{p.value}" for s, p in gone))
        if self._path is not None:
            self.reload()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def reload(self) -> bool:
        """Re-read the file now; returns whether a new policy took effect."""
        if self._path is None:
            return False
        self._stamp = self._file_stamp()
        try:
            policy = load_policy(self._path, self._default_scale, self._available)
        except ValueError as exc:
            self._metrics.routing_reloads.labels(result="error").inc()
            log.error("routing file not reloaded, keeping the previous weights: %s", exc)
            return False
        self._metrics.routing_reloads.labels(result="ok").inc()
        if policy != self.policy:
            self.policy = policy
            log.info("routing reloaded: %s", _describe(policy))
            if self._on_change is not None:
                self._on_change(policy)
        return True

    def check(self) -> bool:
        """Reload if the file's mtime or size changed since the last read."""
        if self._path is None or self._file_stamp() == self._stamp:
            return False
        return self.reload()

    async def watch(self, interval_s: float) -> None:
        """Check every ``interval_s`` until cancelled (ConfigMap updates arrive as a new file
        swapped in by symlink, which changes the stat we compare)."""
        while True:
            await asyncio.sleep(interval_s)
            self.check()
