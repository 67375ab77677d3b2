"""What one Redis broker object has handed out and not yet seen settled.

A fetch whose reply is lost (Redis stalled past `socket_timeout`) may still have moved
messages into the consumer's in-flight list, where the consumer's own live lease would keep
them forever. So each broker object counts the payloads its fetches handed out (a multiset;
acks, releases and dead letters through the object take them off) in a `Ledger`. After a
failed fetch, the next fetch first reads the in-flight list and gives back, unchanged, every
payload the ledger cannot account for: nobody ever received those. The consumer keeps its
id, so its running and prefetched messages stay leased.

Payloads settled by another process (a forked child acking) leave stale counts behind,
which are harmless (an extra count only keeps a payload that is no longer there) and are
dropped by the same reading of the list whenever the count grows large.

A reading must not overlap a fetch of the same object: a fetch's payloads are in the list
before they are counted. The ledger therefore also counts running fetches, and a reading
waits for none and makes new ones wait for it. Acks and releases may run meanwhile.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from celeriac.brokers.base import Delivery
from celeriac.brokers.redis_layout import TAG_SEP

RECONCILE_FLOOR = 1000  # distinct payloads counted before the in-flight list is read to prune
RECHECKS_PER_LEASE = 4  # after a failure, how often per lease the list is read again
MOST_SETTLED_LATER = 4096  # acks kept aside before they are taken off the count without a fetch


class Ledger:
    """The payloads one broker object handed out under `consumer_id` and has not seen settled.

    Args:
        consumer_id: The consumer whose in-flight list the deliveries were leased into; only
            deliveries tagged with it are taken off when settled.
        lease_timeout: Seconds; after a failed fetch, the list is read again now and then for
            one lease, in case the lost fetch ran late in a stalled server.
    """

    def __init__(self, consumer_id: str, lease_timeout: float) -> None:
        self.consumer_id = consumer_id
        self.lease_timeout = lease_timeout
        self._own_tags = consumer_id + TAG_SEP
        self._handed: collections.Counter[bytes] = collections.Counter()
        self._lock = threading.Lock()
        self._books = threading.Condition(self._lock)  # waits on `_lock`, which the rest takes directly
        self._fetching = 0
        self._reconciling = False
        self._unsure = False  # a fetch failed and no reading has succeeded since
        self._recheck_until = 0.0  # and until this time.monotonic(), read the list now and then
        self._next_recheck = 0.0
        self._prune_at = RECONCILE_FLOOR
        self._settled_later: collections.deque[Delivery] = collections.deque()  # see settle_later

    def __len__(self) -> int:
        """How many distinct payloads are counted as handed out."""
        return len(self._handed)

    # fetches -----------------------------------------------------------------------------

    def enter_fetch(self, reconcile: Callable[[], None]) -> None:
        """Count a fetch as running; first call `reconcile` if a reading is due and no fetch runs.

        Args:
            reconcile: Reads the in-flight list, calls `take_stock`, gives back what it
                returns and calls `reconciled`. An error from it propagates; the reading
                stays due.
        """
        books = self._books
        with books:
            while self._reconciling:
                books.wait()
            if self._fetching > 0 or not self._reading_due():
                self._fetching += 1
                return
            self._reconciling = True
        try:
            reconcile()
        except BaseException:
            with books:
                self._reconciling = False
                books.notify_all()
            raise
        with books:  # in one step, so no other reading starts before this fetch counts
            self._reconciling = False
            self._fetching += 1
            books.notify_all()

    def leave_fetch(self, found: Sequence[Delivery]) -> None:
        """Count the payloads a fetch returned and the fetch as ended, in one step: no reading misses them."""
        with self._lock:
            self._take_off(_drained(self._settled_later))
            if found:
                self._handed.update(delivery.payload for delivery in found)
            self._fetching -= 1

    def fetch_failed(self) -> None:
        """Have the next fetches read the list: the failed one may have leased messages.

        Until a reading succeeds, every fetch starts with one; then fetches read again a few
        times over one lease, for a lost fetch that a stalled server ran late.
        """
        with self._books:
            self._unsure = True
            self._recheck_until = time.monotonic() + self.lease_timeout

    def _reading_due(self) -> bool:
        if self._unsure or len(self._handed) >= self._prune_at:
            return True
        return self._next_recheck <= time.monotonic() < self._recheck_until

    # readings ----------------------------------------------------------------------------

    def take_stock(self, listed: Sequence[bytes]) -> list[bytes]:
        """Compare the in-flight list with the count: forget what left it, return what nobody received.

        Args:
            listed: The in-flight list as read, newest first.

        Returns:
            The payloads to give back, one entry per copy, newest first.
        """
        present = collections.Counter(listed)
        with self._books:
            unseen = present - self._handed
            self._handed &= present  # settled elsewhere (a forked child's ack): forget them
            self._prune_at = max(RECONCILE_FLOOR, 2 * len(self._handed))
        return copies_in_order(listed, unseen) if unseen else []

    def reconciled(self) -> None:
        """Note that a reading succeeded and its payloads were given back."""
        with self._books:
            self._unsure = False
            self._next_recheck = time.monotonic() + self.lease_timeout / RECHECKS_PER_LEASE

    # settling ----------------------------------------------------------------------------

    def settled(self, deliveries: Sequence[Delivery]) -> None:
        """Take deliveries off the count once acked, released or dead-lettered through this object."""
        with self._lock:
            self._take_off(deliveries)

    def settle_later(self, delivery: Delivery) -> None:
        """Take a delivery off the count at the next fetch or `count_settled`.

        For the ack of every task: it costs one append, without the lock. Until then the
        payload counts as handed out, which only keeps a reading from returning it. An
        object that acks without fetching (a parent settling for a dead child) takes them
        off every `MOST_SETTLED_LATER`, unless a reading is under way.
        """
        later = self._settled_later
        later.append(delivery)
        if len(later) >= MOST_SETTLED_LATER:
            with self._lock:
                if not self._reconciling:
                    self._take_off(_drained(later))

    def count_settled(self) -> None:
        """Take off the count what `settle_later` was given so far.

        A reading calls this before it confirms the acks and reads the list: what is settled
        later may be an ack that has not run yet, whose payload the list still holds and
        which must not look like a payload nobody received.
        """
        with self._lock:
            self._take_off(_drained(self._settled_later))

    def _take_off(self, deliveries: Iterable[Delivery]) -> None:
        own = self._own_tags
        handed = self._handed
        for delivery in deliveries:
            if delivery.tag.startswith(own):
                left = handed[delivery.payload] - 1
                if left > 0:
                    handed[delivery.payload] = left
                else:
                    handed.pop(delivery.payload, None)


def _drained(queue: collections.deque[Delivery]) -> Iterator[Delivery]:
    """Pop `queue` from the left until it is empty; other threads may append meanwhile."""
    while True:
        try:
            yield queue.popleft()
        except IndexError:
            return


def copies_in_order(listed: Sequence[bytes], wanted: collections.Counter[bytes]) -> list[bytes]:
    """The payloads of `wanted`, one entry per copy, in the order they appear in `listed`."""
    left = collections.Counter(wanted)
    found = []
    for payload in listed:
        if left[payload] > 0:
            left[payload] -= 1
            found.append(payload)
    return found
