"""Celery protocol v2 task messages, and the kombu-style envelope they travel in.

A `TaskMessage` is what a task call means; an `Envelope` is that message serialised
(headers, properties, body bytes); `pack`/`unpack` turn an envelope into the single JSON
document kombu stores in a Redis list (body base64-encoded) and that our SQLite broker
stores too, so every broker moves the same opaque bytes.
"""

from __future__ import annotations

import base64
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
_SHORT_STRING = 200


def _plain(value: Any) -> bool:
    # Containers of numbers and short strings: repr() is cheap and bounded, no reprlib needed.
    items = value.values() if isinstance(value, dict) else value
    return len(items) <= 30 and all(
        type(item) in _SCALARS or (type(item) is str and len(item) <= _SHORT_STRING) for item in items
    )


def short_repr(value: Any, limit: int = ARGSREPR_LIMIT) -> str:
    """Return a bounded repr of `value`, as shown in logs, events and inspect replies."""
    fast = type(value) in (tuple, list, dict) and _plain(value)
    text = repr(value) if fast else _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uuid4_text() -> str:
    # str(uuid.uuid4()) builds and validates a UUID object; this makes the same text directly.
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True, slots=True)
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
        limits = self.headers.get("timelimit") or (None, None)
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


@dataclass(frozen=True, slots=True)
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


def decode_task(envelope: Envelope, accept: frozenset[str]) -> TaskMessage:
    """Turn an envelope back into a task message, refusing content types outside `accept`."""
    headers = envelope.headers
    if "task" not in headers or "id" not in headers:
        raise ProtocolError("not a protocol v2 task message: headers lack 'task' or 'id'")
    body = serializers.loads(envelope.body, envelope.content_type, accept)
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise ProtocolError("task body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    embed = embed or {}
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise ProtocolError("task body args must be a list, kwargs an object and embed an object or null")
    message = TaskMessage(headers, args, kwargs, embed, envelope.properties)
    _check_headers(message)
    return message


def _check_headers(message: TaskMessage) -> None:
    """Read now every header the worker acts on, so a malformed one is refused instead of crashing it."""
    try:
        _ = message.eta, message.expires, message.retries, message.priority
        _ = [float(limit) for limit in message.timelimit if limit is not None]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed task header: {exc}") from exc


def pack(envelope: Envelope, routing_key: str, exchange: str = "") -> bytes:
    """Wrap an envelope as the JSON document kombu puts on a queue."""
    properties = dict(envelope.properties)
    properties["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = _uuid4_text()
    document = {
        "body": base64.b64encode(envelope.body).decode("ascii"),
        "content-encoding": envelope.content_encoding,
        "content-type": envelope.content_type,
        "headers": envelope.headers,
        "properties": properties,
    }
    return serializers.json_dumps_envelope(document)


def unpack(raw: bytes | str) -> Envelope:
    """Read a kombu JSON envelope; raise `ProtocolError` if it is not one."""
    try:
        document = serializers.json_loads(raw)
    except (ValueError, ProtocolError) as exc:
        raise ProtocolError(f"message is not a JSON envelope: {exc}") from exc
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
    if encoding == "base64":
        return base64.b64decode(body, validate=True)
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8")
