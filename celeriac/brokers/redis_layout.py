"""Where the Redis broker keeps messages, how it tags and records them, and its Lua scripts.

Key layout (``Q`` is a queue name; ``\\x06\\x16`` is kombu's separator)::

    Q, Q\\x06\\x163, Q\\x06\\x166, Q\\x06\\x169
        LISTs: kombu's queue Q, one list per priority step (0-2, 3-5, 6-8, 9; on Redis 0 is
        the most urgent). Publishing LPUSHes the packed envelope; consumers take from the
        right, the lists in that order, every queue's first list before any queue's second.
    _kombu.binding.Q
        SET with the member ``Q\\x06\\x16\\x06\\x16Q``: kombu's binding of queue Q to the
        exchange Q, added on first use so Celery clients and ``inspect`` see the queue.
    celeriac.inflight.<consumer id>
        LIST of the exact payloads leased to one consumer (newest left). A fetch moves
        payloads from queue lists into it atomically (Lua, or BLMOVE while waiting).
    celeriac.consumers
        ZSET consumer id -> unix time (Redis server clock) its lease ends. A fetch or a
        heartbeat renews it; any heartbeat returns the in-flight payloads of lapsed consumers.
    celeriac.delayed.Q
        ZSET payload -> eta, one per queue: messages released with an eta. Fetches from Q
        move the due ones to the back of their list. Per queue, so size() and scheduled()
        are one ZCARD / ZCOUNT and a fetch only looks at its own queues.
    celeriac.dead
        LIST of dead-letter records, JSON ``{queue, payload, reason, when}`` (newest left).

A `Delivery.tag` is ``<consumer id>|<step>|<n>``: the in-flight list and the list the
payload came from, so ack, release and dead_letter work from any process, such as a
forked pool child with a consumer id of its own.

On Redis Cluster a script may touch only keys of one hash slot, so everything about queue
``Q`` lives in the slot of the hash tag ``{Q}`` (`ClusterLayout`; the plain key ``Q`` hashes
to that same slot, so the most urgent list keeps kombu's name)::

    Q, {Q}\x06\x163, {Q}\x06\x166, {Q}\x06\x169   the queue's lists
    celeriac.inflight.{Q}.<consumer id>            payloads that consumer leased from Q
    celeriac.consumers.{Q}                         leases of the consumers that took from Q
    celeriac.delayed.{Q}, celeriac.dead.{Q}        Q's parked messages and dead letters
    _kombu.binding.Q                               as on a single server (touched alone)
    celeriac.queues                                SET of every queue used (heartbeats walk it)

A delivery's in-flight list is then named by its tag's consumer and its queue.

The scripts live in ``lua/``; `SCRIPT_HELPERS` says which helper files each one runs after.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis
from redis.commands.core import Script

from celeriac.brokers.base import DeadLetter, clamp_priority
from celeriac.exceptions import ImproperlyConfigured

logger = logging.getLogger("celeriac.brokers.redis")

SEP = "\x06\x16"
STEP_SUFFIXES = ("", SEP + "3", SEP + "6", SEP + "9")
_STEP_OF_PRIORITY = (0, 0, 0, 1, 1, 1, 2, 2, 2, 3)
CONSUMERS_KEY = "celeriac.consumers"
INFLIGHT_PREFIX = "celeriac.inflight."
DELAYED_PREFIX = "celeriac.delayed."
DEAD_KEY = "celeriac.dead"
TAG_SEP = "|"
REDELIVERIES_HEADER = "x-celeriac-redeliveries"
REDELIVERIES_MARK = b'"' + REDELIVERIES_HEADER.encode() + b'"'

QUEUES_KEY = "celeriac.queues"

Arg = bytes | str | int | float  # a command or script argument


# keys -----------------------------------------------------------------------------------------


def queue_lists(queue: str) -> tuple[str, str, str, str]:
    """Return the keys of a queue's four lists, most urgent step first."""
    return (queue, queue + STEP_SUFFIXES[1], queue + STEP_SUFFIXES[2], queue + STEP_SUFFIXES[3])


class KeyLayout:
    """The keys on one Redis server: kombu's names, and celeriac's own keys shared by all queues."""

    def list_key(self, queue: str, step: int) -> str:
        """Return the key of `queue`'s list for priority `step` (0-3)."""
        return queue + STEP_SUFFIXES[step]

    def lists(self, queue: str) -> tuple[str, str, str, str]:
        """Return the keys of `queue`'s four lists, most urgent step first."""
        return queue_lists(queue)

    def inflight_prefix(self, queue: str) -> str:
        """Return what a consumer id follows in the key of its in-flight list for `queue`."""
        return INFLIGHT_PREFIX

    def inflight(self, consumer_id: str, queue: str) -> str:
        """Return the key of the in-flight list holding what `consumer_id` leased from `queue`."""
        return INFLIGHT_PREFIX + consumer_id

    def consumers(self, queue: str) -> str:
        """Return the key of the leases of the consumers that take from `queue`."""
        return CONSUMERS_KEY

    def delayed(self, queue: str) -> str:
        """Return the key of `queue`'s parked messages."""
        return DELAYED_PREFIX + queue

    def dead(self, queue: str) -> str:
        """Return the key of the dead letters of `queue`."""
        return DEAD_KEY


class ClusterLayout(KeyLayout):
    """The keys on Redis Cluster: all of queue ``Q``'s in the hash slot of the tag ``{Q}``.

    Every method refuses a queue name that would break the rule (see `check_queue`).
    """

    def list_key(self, queue: str, step: int) -> str:
        """Return the key of `queue`'s list for `step`: ``Q`` for 0, else ``{Q}`` and kombu's suffix."""
        return check_queue(queue) if step == 0 else "{" + check_queue(queue) + "}" + STEP_SUFFIXES[step]

    def lists(self, queue: str) -> tuple[str, str, str, str]:
        """Return the keys of `queue`'s four lists, most urgent step first."""
        tagged = "{" + check_queue(queue) + "}"
        return (queue, tagged + STEP_SUFFIXES[1], tagged + STEP_SUFFIXES[2], tagged + STEP_SUFFIXES[3])

    def inflight_prefix(self, queue: str) -> str:
        """Return ``celeriac.inflight.{Q}.``, which a consumer id follows."""
        return INFLIGHT_PREFIX + "{" + check_queue(queue) + "}."

    def inflight(self, consumer_id: str, queue: str) -> str:
        """Return ``celeriac.inflight.{Q}.<consumer id>``."""
        return self.inflight_prefix(queue) + consumer_id

    def consumers(self, queue: str) -> str:
        """Return ``celeriac.consumers.{Q}``."""
        return CONSUMERS_KEY + ".{" + check_queue(queue) + "}"

    def delayed(self, queue: str) -> str:
        """Return ``celeriac.delayed.{Q}``."""
        return DELAYED_PREFIX + "{" + check_queue(queue) + "}"

    def dead(self, queue: str) -> str:
        """Return ``celeriac.dead.{Q}``."""
        return DEAD_KEY + ".{" + check_queue(queue) + "}"


def check_queue(queue: str) -> str:
    """Return `queue` if its keys can share one Redis Cluster hash slot.

    Raises:
        ImproperlyConfigured: The name is empty or holds a brace: Redis would hash its keys
            by some other part of the name, or by the whole key.
    """
    if not queue or "{" in queue or "}" in queue:
        raise ImproperlyConfigured(
            f"the queue name {queue!r} cannot be used on Redis Cluster: celeriac keeps a queue's "
            "keys in the hash slot of the tag {<queue>}, so a name must be non-empty and hold no '{' or '}'"
        )
    return queue


def binding(queue: str) -> tuple[str, str]:
    """Return kombu's binding SET key for `queue` and the member that binds it."""
    return f"_kombu.binding.{queue}", f"{queue}{SEP}{SEP}{queue}"


def step_of(priority: int) -> int:
    """Return which of a queue's lists (0-3) holds messages of `priority`, as kombu maps it."""
    return _STEP_OF_PRIORITY[clamp_priority(priority)]


def refuse_other_layouts(options: Mapping[str, Any]) -> None:
    """Refuse kombu options that move the keys.

    Ignoring them would leave celeriac and Celery silently blind to each other's messages.

    Raises:
        ImproperlyConfigured: One of them holds something other than kombu's default.
    """
    layout = {"global_keyprefix": "", "sep": SEP, "priority_steps": [0, 3, 6, 9]}
    for name, default in layout.items():
        if name in options and options[name] != default:
            raise ImproperlyConfigured(
                f"The Redis broker supports only kombu's default {name} ({default!r}), "
                f"not {options[name]!r}: remove it from broker_transport_options"
            )


# tags -----------------------------------------------------------------------------------------


def tag_prefix(consumer_id: str, step: int | str) -> str:
    """The start of the tags of payloads leased to `consumer_id` from a queue's list `step`."""
    return f"{consumer_id}{TAG_SEP}{step}{TAG_SEP}"


def parse_tag(tag: str) -> tuple[str, int] | None:
    """Return the consumer id and list step a tag names, or None if it is not one of ours."""
    consumer_id, _, rest = tag.partition(TAG_SEP)
    step, _, _ = rest.partition(TAG_SEP)
    return (consumer_id, int(step)) if step in ("0", "1", "2", "3") else None


def inflight_of(tag: str) -> str:
    """Return the key of the in-flight list a tagged payload was leased into (on one server)."""
    return INFLIGHT_PREFIX + tag.partition(TAG_SEP)[0]


def consumer_of(tag: str) -> str:
    """Return the consumer id a tag names (the whole tag if it is not one of ours)."""
    return tag.partition(TAG_SEP)[0]


# envelopes and records ------------------------------------------------------------------------


def attempts(payload: bytes) -> int:
    """Return how often a payload has been delivered: its redelivery count plus one."""
    if payload.find(REDELIVERIES_MARK) < 0:  # find: `in` takes a slower path for bytes
        return 1
    try:
        headers = orjson.loads(payload).get("headers") or {}
        return 1 + int(headers.get(REDELIVERIES_HEADER) or 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1


def dead_record(queue: str, payload: bytes, reason: str, when: float) -> bytes:
    """Return the JSON record kept in the dead-letter list; payloads that are not UTF-8 go hex."""
    record: dict[str, Any] = {"queue": queue, "reason": reason, "when": when}
    try:
        record["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload"], record["payload_encoding"] = payload.hex(), "hex"
    return orjson.dumps(record)


def read_dead_record(raw: bytes) -> DeadLetter | None:
    """Return the dead letter a record holds, or None (with a warning) if it is unreadable."""
    try:
        record = orjson.loads(raw)
        text = str(record["payload"])
        payload = bytes.fromhex(text) if record.get("payload_encoding") == "hex" else text.encode("utf-8")
        return DeadLetter(str(record["queue"]), payload, str(record["reason"]), float(record["when"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("Skipping an unreadable record in %s: %r", DEAD_KEY, raw[:200])
        return None


# scripts --------------------------------------------------------------------------------------

SCRIPT_HELPERS = {  # each script and the helper files put in front of it, in order
    "fetch": ("envelope",),
    "release": ("envelope",),
    "recover": ("envelope", "inflight"),
    "reclaim": ("envelope", "inflight"),
    "reconcile": ("envelope", "inflight"),
    "dead_letter": (),
    "purge": (),
}


@functools.cache
def script_sources() -> dict[str, str]:
    """The Lua scripts by name, each preceded by the helpers it uses."""
    folder = resources.files("celeriac.brokers") / "lua"
    sources = {}
    for name, helpers in SCRIPT_HELPERS.items():
        parts = [(folder / f"{part}.lua").read_text(encoding="utf-8") for part in (*helpers, name)]
        sources[name] = "\n".join(parts)
    return sources


@dataclass(frozen=True, slots=True)
class Scripts:
    """The broker's scripts, registered with one client (each call runs EVALSHA, then EVAL)."""

    fetch: Script
    release: Script
    recover: Script
    reclaim: Script
    reconcile: Script
    dead_letter: Script
    purge: Script

    @classmethod
    def register(cls, client: redis.Redis) -> Scripts:
        """Register every script with `client`."""
        return cls(**{name: client.register_script(source) for name, source in script_sources().items()})
