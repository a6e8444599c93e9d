"""Reservations: blocks of a shared bucket's units a replica takes ahead of its requests.

Far from a limit, asking Redis about every request buys nothing but a round
trip. So when the limiter does call Redis it may also ask, per rate bucket,
for a block of units beyond the request's own cost: the script charges that
block to the shared bucket in the same atomic call, and this replica's next
requests spend it here, with no Redis call, until it runs out or expires.

The limit still holds for the fleet: every unit spent locally was charged in
Redis first, so replicas together can never admit more than the bucket
allows. What a reservation can cost is the opposite error, briefly: units
parked on a quiet replica while a busy one is refused. Three things bound
that. A block is a small share of the bucket's capacity; the script grants
none unless at least as much again stays in the bucket, so near empty every
replica decides request by request in Redis; and an unused block goes back
to the bucket after a short TTL. Buckets too small for a block to hold two
requests' worth never reserve (a per-agent 60 RPM rule decides exactly).

Token corrections (real usage against the estimate) of a bucket with a live
block are applied to the block instead of being sent to Redis: the block is
charged already, and whatever of it is left, more or less, is settled with
Redis when it is returned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.ratelimit.decision import BucketState
from proxy.ratelimit.policy import Charge


@dataclass(slots=True)
class _Block:
    charge: Charge  # the bucket (cost unused)
    units: int  # left to spend; negative once corrections overdrew it
    expires: float  # monotonic seconds
    remaining: int  # the bucket's own remaining units when the block was granted
    reset_s: float  # the bucket's time to full when the block was granted
    granted_at: float


class Reservations:
    """This replica's blocks, one per bucket key (see the module docstring)."""

    def __init__(self, share: float, ttl_s: float) -> None:
        self.share = share
        self.ttl_s = ttl_s
        self._blocks: dict[str, _Block] = {}
        self._next_expiry = float("inf")
        self.granted = 0  # blocks granted, for /status

    def __len__(self) -> int:
        return len(self._blocks)

    def block_size(self, charge: Charge) -> int:
        """Units to ask for with ``charge`` (0: this bucket does not reserve now)."""
        quota = charge.quota
        if quota.kind == "concurrent" or charge.cost <= 0:
            return 0
        size = int(quota.capacity * self.share)
        if size < 2 * charge.cost:
            return 0  # a block that would not even cover the next request
        held = self._blocks.get(charge.key)
        if held is not None and held.units >= size // 2:
            return 0  # plenty left: this call was made for another bucket's sake
        return size

    def take(self, charges: list[Charge], now: float) -> list[BucketState] | None:
        """Admit from blocks alone if every charge is covered, else take nothing."""
        blocks = []
        for c in charges:
            block = self._blocks.get(c.key)
            if block is None or block.units < c.cost or block.expires <= now:
                return None
            blocks.append(block)
        out = []
        for c, block in zip(charges, blocks, strict=True):
            block.units -= c.cost
            # As the bucket stood when the block was granted, plus what is left of
            # the block: an estimate, since other replicas spend meanwhile.
            out.append(BucketState(min(c.quota.capacity, block.remaining + max(0, block.units)),
                                   max(0.0, block.reset_s - (now - block.granted_at)), 0.0))
        return out

    def grant(self, charge: Charge, units: int, remaining: int, reset_s: float,
              now: float) -> None:
        """Add ``units`` the script granted for ``charge``'s bucket."""
        block = self._blocks.get(charge.key)
        expires = now + self.ttl_s
        if block is None:
            self._blocks[charge.key] = _Block(charge, units, expires, remaining, reset_s, now)
        else:
            block.units += units
            block.expires, block.remaining, block.reset_s, block.granted_at = (
                expires, remaining, reset_s, now)
        self._next_expiry = min(self._next_expiry, expires)
        self.granted += 1

    def held(self, key: str) -> int:
        """Units of ``key``'s block left to spend (0 without one)."""
        block = self._blocks.get(key)
        return max(0, block.units) if block is not None else 0

    def correct(self, charge: Charge, now: float) -> bool:
        """Apply a token correction to the bucket's live block; False if it has none."""
        block = self._blocks.get(charge.key)
        if block is None or block.expires <= now:
            return False
        block.units -= charge.cost
        return True

    def due(self, now: float) -> bool:
        """Whether some block has expired and should go back."""
        return now >= self._next_expiry

    def expired(self, now: float) -> list[Charge]:
        """Remove expired blocks; the charges that settle them with Redis.

        A refund of the units left, or, for a block that corrections overdrew,
        a charge of the overdraft.
        """
        out = []
        next_expiry = float("inf")
        for key, block in list(self._blocks.items()):
            if block.expires <= now:
                del self._blocks[key]
                if block.units:
                    out.append(replace(block.charge, cost=-block.units))
            else:
                next_expiry = min(next_expiry, block.expires)
        self._next_expiry = next_expiry
        return out

    def release_all(self) -> list[Charge]:
        """Remove every block (shutdown); the charges that settle them."""
        out = [replace(b.charge, cost=-b.units) for b in self._blocks.values() if b.units]
        self._blocks.clear()
        self._next_expiry = float("inf")
        return out
