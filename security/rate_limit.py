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


class SignInLimiter:
    """Failed sign-ins, counted per presented key *and* per client address.

    - Per key (an API key's id, a JWT's subject; other tokens count as themselves): after
      ``per_key`` failures in a minute, that key is refused (429) from every address until the
      window passes, valid secret or not, so that brute force on one key gets nowhere and a right
      guess is not even confirmed.
    - Per address: ``per_address`` failures in a minute (many keys failing) make the address
      clearly abusive; it is then refused for every key *except* those that signed in successfully
      from it within ``remember_minutes``. So one attacker behind a shared proxy or NAT (one address
      for everyone) cannot lock out the people behind it whose keys are in use, and cannot lock out
      any other key unless they know its id.
    """

    def __init__(self, per_key: int, per_address: int, storage_uri: str = "memory://", namespace: str = "authfail",
                 remember_minutes: int = 60):
        self.keys = RateLimiter(per_key, None, storage_uri, f"{namespace}-key")
        self.addresses = RateLimiter(per_address, None, storage_uri, f"{namespace}-addr") if per_address > 0 else None
        self._signed_in = RateLimitItemPerMinute(1, remember_minutes, namespace=f"{namespace}-ok")
        self._memory = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def retry_after(self, address: str, key: str) -> tuple[int, str] | None:
        """(seconds, which limit) if a sign-in with ``key`` from ``address`` must wait; None if not."""
        wait = self.keys.retry_after(key)
        if wait is not None:
            return wait, "failed sign-ins with this key"
        if self.addresses is not None and (wait := self.addresses.retry_after(address)) is not None:
            if self._memory.test(self._signed_in, address, key):  # True: no sign-in remembered
                return wait, "failed sign-ins from this address"
        return None

    def failed(self, address: str, key: str) -> None:
        self.keys.hit(key)
        if self.addresses is not None:
            self.addresses.hit(address)

    def succeeded(self, address: str, key: str) -> None:
        if self._memory.test(self._signed_in, address, key):
            self._memory.hit(self._signed_in, address, key)
