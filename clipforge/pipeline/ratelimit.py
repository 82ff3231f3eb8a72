"""Per-host request rate limits shared by every download thread of a build.

Each host gets a token bucket (`per_domain_rps` tokens per second, at most `per_domain_burst`
saved up). A request takes a token; when none is left it takes one on credit and waits until the
credit is paid back, so concurrent callers are spaced out in the order they asked.

Within one process the buckets live in a `DomainBuckets` behind a lock. Across the shard tasks of a
build they live in one Ray actor (`RateLimiterActor`); each request asks it for a wait time and
sleeps locally, so the actor never blocks and one round trip per request is its whole cost.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

Limiter = Callable[[str], None]


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float):
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def reserve(self, now: float) -> float:
        """Take one token; return how many seconds the caller must wait before using it."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class DomainBuckets:
    """One bucket per host name, created on first use; thread-safe."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(host)
            if bucket is None:
                bucket = self._buckets[host] = TokenBucket(self.rate, self.burst, now)
            return bucket.reserve(now)

    def wait(self, host: str) -> None:
        delay = self.reserve(host)
        if delay > 0:
            time.sleep(delay)


class RateLimiterActor:
    """The build-wide buckets; run as a Ray actor (see `start_shared_limiter`)."""

    def __init__(self, rate: float, burst: int):
        self.buckets = DomainBuckets(rate, burst)

    def reserve(self, host: str) -> float:
        return self.buckets.reserve(host)


class ActorLimiter:
    """Client side of the shared buckets: picklable, so it travels into each shard task."""

    def __init__(self, actor: Any):
        self.actor = actor

    def __call__(self, host: str) -> None:
        import ray

        delay = ray.get(self.actor.reserve.remote(host))
        if delay > 0:
            time.sleep(delay)


def start_shared_limiter(rate: float, burst: int) -> tuple[ActorLimiter, Any]:
    """Start the build's limiter actor (Ray must be up); returns the client and the actor to kill at the end."""
    import ray

    # No CPU reserved: it only does arithmetic, and must never wait for a free CPU behind the downloads.
    actor = ray.remote(RateLimiterActor).options(num_cpus=0, max_concurrency=256).remote(rate, burst)
    return ActorLimiter(actor), actor
