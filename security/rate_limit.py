"""Per-principal request limits on the `limits` package (moving windows, pluggable storage).

Why `limits` and not slowapi or a hand-written bucket: slowapi keys limits per decorated route
from the request before authentication and needs a decorator and a `request` argument on every
endpoint; Enclave limits the *principal* (API key or token subject), known only after the auth
dependency ran. `limits` is the maintained engine underneath slowapi and flask-limiter: exact
moving windows, thread-safe in-memory storage, and the same code against Redis/Memcached when
several worker processes or replicas must share one budget (``storage_uri``).

A token bucket with rate r per minute and capacity b is approximated by two moving windows:
at most r requests in any minute, and at most b requests in the b*60/r seconds a bucket needs to
earn b tokens. Retry-After is when the oldest request of the exhausted window leaves it.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class RateLimiter:
    def __init__(self, per_minute: int, burst: int | None = None, storage_uri: str = "memory://", namespace: str = "rl"):
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1 (leave the limiter out to switch it off)")
        self.items: list[RateLimitItem] = [RateLimitItemPerMinute(per_minute, namespace=namespace)]
        if burst is not None and burst < per_minute:
            window = max(1, math.ceil(60 * burst / per_minute))
            self.items.append(RateLimitItemPerSecond(burst, window, namespace=namespace))
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may try again if it is over a limit now; None if it is not."""
        waits = []
        for item in self.items:
            if not self._limiter.test(item, key):
                reset = self._limiter.get_window_stats(item, key).reset_time
                waits.append(max(1, math.ceil(reset - time.time())))
        return max(waits) if waits else None

    def hit(self, key: str) -> int | None:
        """Counts one request; returns None if it is admitted, else the Retry-After seconds (not counted)."""
        wait = self.retry_after(key)
        if wait is not None:
            return wait
        for item in self.items:
            self._limiter.hit(item, key)
        return None
