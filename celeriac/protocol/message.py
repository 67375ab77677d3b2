"""Celery protocol v2 task messages, and the kombu-style envelope they travel in.

A `TaskMessage` is what a task call means; an `Envelope` is that message serialised
(headers, properties, body bytes); `pack`/`unpack` turn an envelope into the single JSON
document kombu stores in a Redis list (body base64-encoded) and that our SQLite broker
stores too, so every broker moves the same opaque bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celeriac.exceptions import ProtocolError
from celeriac.protocol import serializers

ARGSREPR_LIMIT = 1024
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 30
_repr.maxlevel = 4


_SCALARS = frozenset({int, float, bool, type(None)})
_REPR_CHEAP = _SCALARS | {str}
_SHORT_STRING = 200


def _plain(value: Any) -> bool:
    # Containers of numbers and short strings: repr() is cheap and bounded, no reprlib needed.
    items = value.values() if isinstance(value, dict) else value
    if len(items) > 30:
        return False
    kinds = set(map(type, items))
    if not kinds <= _REPR_CHEAP:
        return False
    return str not in kinds or all(len(item) <= _SHORT_STRING for item in items if type(item) is str)


def short_repr(value: Any, limit: int = ARGSREPR_LIMIT) -> str:
    """Return a bounded repr of `value`, as shown in logs, events and inspect replies."""
    fast = type(value) in (tuple, list, dict) and _plain(value)
    text = repr(value) if fast else _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ID_BATCH = 64  # ids made per os.urandom call
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}  # RFC 4122 variant bits
_spare_ids: list[str] = []  # random ids made ahead; list.pop is atomic, so threads share it safely


def _uuid4_batch() -> list[str]:
    # str(uuid.uuid4()) builds and validates a UUID object per id; this lays out the same text
    # (version nibble 4, variant 10xx) straight from the hex of one larger urandom read.
    text = os.urandom(16 * _ID_BATCH).hex()
    return [
        f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
        for h in (text[start : start + 32] for start in range(0, len(text), 32))
    ]


def _uuid4_text() -> str:
    try:
        return _spare_ids.pop()
    except IndexError:
        _spare_ids.extend(_uuid4_batch())
        return _spare_ids.pop()


# A forked child must not hand out the ids its parent already holds.
os.register_at_fork(after_in_child=_spare_ids.clear)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a microsecond per message to build
class TaskMessage:
    """One task call in Celery protocol v2: headers plus the `[args, kwargs, embed]` body."""

    headers: Mapping[str, Any]
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    embed: Mapping[str, Any] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.headers["task"])

    @property
    def id(self) -> str:
        return str(self.headers["id"])

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)

    @property
    def eta(self) -> datetime | None:
        return parse_time(self.headers.get("eta"))

    @property
    def expires(self) -> datetime | None:
        return parse_time(self.headers.get("expires"))

    @property
    def timelimit(self) -> tuple[float | None, float | None]:
        """Return `(hard, soft)`: Celery sends the hard limit first."""
        limits = self.headers.get("timelimit")
        if not limits:
            return None, None
        if len(limits) == 2:  # as Celery sends it
            return limits[0], limits[1]
        hard, soft = [*list(limits), None, None][:2]
        return hard, soft

    @property
    def priority(self) -> int:
        return int(self.properties.get("priority") or 0)


def parse_time(value: Any) -> datetime | None:
    """Read an eta/expires header (ISO-8601 string, or a datetime already)."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise ProtocolError(f"not an ISO-8601 time: {value!r}") from exc


def new_id() -> str:
    """Return a fresh task id (a uuid4 string, as Celery makes them)."""
    return _uuid4_text()


@dataclass(slots=True)  # not frozen, as TaskMessage
class Envelope:
    """A serialised message: what a broker carries, before the kombu JSON wrapping."""

    body: bytes
    content_type: str
    content_encoding: str
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]


def encode_task(message: TaskMessage, serializer: serializers.Serializer) -> Envelope:
    """Serialise a task message's body with `serializer`."""
    body = serializer.dumps([list(message.args), dict(message.kwargs), dict(message.embed)])
    return Envelope(
        body=body,
        content_type=serializer.content_type,
        content_encoding=serializer.content_encoding,
        headers=message.headers,
        properties=message.properties,
    )


_SEQUENCES = (list, tuple)  # a tuple, not `list | tuple`: isinstance checks it faster, once per message


def decode_task(envelope: Envelope, accept: frozenset[str]) -> TaskMessage:
    """Turn an envelope back into a task message, refusing content types outside `accept`."""
    headers = envelope.headers
    if "task" not in headers or "id" not in headers:
        raise ProtocolError("not a protocol v2 task message: headers lack 'task' or 'id'")
    body = serializers.loads(envelope.body, envelope.content_type, accept)
    return _task_of(headers, body, envelope.properties)


def _task_of(headers: Mapping[str, Any], body: Any, properties: Mapping[str, Any]) -> TaskMessage:
    """The task message of v2 headers and a decoded body; raise `ProtocolError` if it is malformed."""
    if not isinstance(body, _SEQUENCES) or len(body) != 3:
        raise ProtocolError("task body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    embed = embed or {}
    if not isinstance(args, _SEQUENCES) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise ProtocolError("task body args must be a list, kwargs an object and embed an object or null")
    message = TaskMessage(headers, args, kwargs, embed, properties)
    _check_headers(message)
    return message


def _check_headers(message: TaskMessage) -> None:
    """Read now every header the worker acts on, so a malformed one is refused instead of crashing it."""
    headers = message.headers
    get = headers.get
    try:
        if get("eta") is not None or get("expires") is not None:
            _ = message.eta, message.expires
        retries, priority = get("retries"), message.properties.get("priority")
        if retries:
            int(retries)
        if priority:
            int(priority)
        limits = get("timelimit")
        if limits and limits != [None, None]:  # Celery sends [None, None] for no limits
            _ = [float(limit) for limit in message.timelimit if limit is not None]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed task header: {exc}") from exc


def pack(envelope: Envelope, routing_key: str, exchange: str = "") -> bytes:
    """Wrap an envelope as the JSON document kombu puts on a queue."""
    document = _document(
        base64.b64encode(envelope.body).decode("ascii"),
        envelope.content_type,
        envelope.content_encoding,
        envelope.headers,
        envelope.properties,
        routing_key,
        exchange,
        _uuid4_text(),
    )
    return serializers.json_dumps_envelope(document)


def _document(
    body: str,
    content_type: str,
    content_encoding: str,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    routing_key: str,
    exchange: str,
    delivery_tag: str,
) -> dict[str, Any]:
    """Lay out kombu's envelope: its keys and the properties kombu adds, in kombu's order."""
    full = dict(properties)
    full["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    full["body_encoding"] = "base64"
    full["delivery_tag"] = delivery_tag
    return {
        "body": body,
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": full,
    }


class EnvelopeTemplate:
    """The bytes `pack` writes for one kind of message, with holes where per-message values go.

    Messages that differ only in their ids, arguments and a few headers share everything
    else, so that part is serialised once: `compile` packs a sample whose varying values are
    marker strings and splits the JSON at them; `fill` puts each message's JSON-encoded values
    back in. The result is byte for byte what `pack` makes of the same message.
    """

    __slots__ = ("_format", "_order", "slots")

    def __init__(self, text: bytes, markers: Sequence[bytes], slots: Sequence[str]) -> None:
        found = sorted(
            (at, index) for index, marker in enumerate(markers) for at in _occurrences(text, marker)
        )
        pieces, order, start = [], [], 0
        for at, index in found:
            pieces.append(text[start:at].replace(b"%", b"%%"))
            order.append(index)
            start = at + len(markers[index])
        pieces.append(text[start:].replace(b"%", b"%%"))
        self._format = b"%b".join(pieces)
        self._order: tuple[int, ...] | None = None if order == list(range(len(markers))) else tuple(order)
        self.slots = tuple(slots)

    @classmethod
    def compile(
        cls,
        *,
        slots: Sequence[str],
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
        content_type: str,
        content_encoding: str,
        routing_key: str,
        exchange: str = "",
    ) -> EnvelopeTemplate:
        """Make the template of messages with these headers and properties.

        Args:
            slots: Names of the per-message values, in the order `fill` takes them. The body
                (base64 text) and the delivery tag are filled by `fill` itself and are not named.
            headers: The headers, holding `template_marker(name)` wherever slot `name`'s value
                goes (a slot may be used more than once, or not at all).
            properties: The properties, marked the same way.
        """
        markers = {name: template_marker(name) for name in ("body", *slots, "delivery_tag")}
        document = _document(
            markers["body"],
            content_type,
            content_encoding,
            headers,
            properties,
            routing_key,
            exchange,
            markers["delivery_tag"],
        )
        text = serializers.json_dumps_envelope(document)
        names = ["body", *slots, "delivery_tag"]
        return cls(text, [serializers.json_dumps_envelope(markers[name]) for name in names], slots)

    def fill(self, body: bytes, values: Sequence[bytes]) -> bytes:
        """Pack one message: its serialised body and its slots' values, each already JSON."""
        body_text = b'"' + binascii.b2a_base64(body, newline=False) + b'"'
        filled = (body_text, *values, b'"' + _uuid4_text().encode() + b'"')
        if self._order is not None:
            filled = tuple(filled[index] for index in self._order)
        return self._format % filled


_MARKER_NONCE = os.urandom(8).hex()


def template_marker(name: str) -> str:
    """The string that stands for slot `name` in a template's sample message."""
    return f"\x00{_MARKER_NONCE}:{name}\x00"


def _occurrences(text: bytes, marker: bytes) -> list[int]:
    found, at = [], text.find(marker)
    while at >= 0:
        found.append(at)
        at = text.find(marker, at + len(marker))
    return found


def unpack(raw: bytes | str) -> Envelope:
    """Read a kombu JSON envelope; raise `ProtocolError` if it is not one."""
    return _envelope(_parsed(raw))


def read_task(raw: bytes | str, accept: frozenset[str]) -> TaskMessage:
    """Read a task message from a kombu JSON envelope: `decode_task(unpack(raw), accept)`.

    A worker reads every message this way. The usual message (a JSON body in base64, as
    Celery and celeriac send it) is read in one pass, without an `Envelope` in between;
    any other goes the general way, which also words the error for a malformed one.
    """
    document = _parsed(raw)
    message = _json_task(document, accept)
    return message if message is not None else decode_task(_envelope(document), accept)


def _parsed(raw: bytes | str) -> Any:
    try:
        return serializers.json_loads(raw)
    except (ValueError, ProtocolError) as exc:
        raise ProtocolError(f"message is not a JSON envelope: {exc}") from exc


def _json_task(document: Any, accept: frozenset[str]) -> TaskMessage | None:
    """The task message of an envelope with a base64 JSON body; None for any other envelope."""
    if type(document) is not dict or document.get("content-type") != serializers.JSON_TYPE:
        return None
    headers, properties = document.get("headers"), document.get("properties")
    if type(headers) is not dict or type(properties) is not dict or serializers.JSON_TYPE not in accept:
        return None
    if "task" not in headers or "id" not in headers or properties.get("body_encoding") != "base64":
        return None
    try:
        body = serializers.json_loads(binascii.a2b_base64(document["body"], strict_mode=True))
    except (KeyError, ValueError, TypeError, ProtocolError):
        return None  # the general way reads it again and words the error
    return _task_of(headers, body, properties)


def _envelope(document: Any) -> Envelope:
    if not isinstance(document, dict) or "body" not in document:
        raise ProtocolError("message is not a kombu envelope: no 'body'")
    properties = document.get("properties") or {}
    headers = document.get("headers") or {}
    if not isinstance(properties, dict) or not isinstance(headers, dict):
        raise ProtocolError("message is not a kombu envelope: headers and properties must be objects")
    body = document["body"]
    try:
        raw_body = _body_bytes(body, properties.get("body_encoding"))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot decode message body: {exc}") from exc
    return Envelope(
        body=raw_body,
        content_type=str(document.get("content-type") or serializers.JSON_TYPE),
        content_encoding=str(document.get("content-encoding") or "utf-8"),
        headers=headers,
        properties=properties,
    )


def _body_bytes(body: Any, encoding: Any) -> bytes:
    if encoding == "base64":  # strictly: an alphabet outside base64 is an error, not skipped
        return binascii.a2b_base64(body, strict_mode=True)
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8")
