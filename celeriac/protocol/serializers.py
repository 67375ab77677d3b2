"""Serializers by name and content type: JSON with kombu's type tags (default) and opt-in pickle.

JSON is written with orjson. Values JSON has no word for travel as
``{"__type__": T, "__value__": V}`` (datetime, date, time, decimal, uuid, bytes, base64),
which is how kombu tags them, so either side reads what the other wrote.
"""

from __future__ import annotations

import base64
import pickle
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

import orjson

from celeriac.exceptions import ContentDisallowed, ProtocolError

JSON_TYPE = "application/json"
PICKLE_TYPE = "application/x-python-serialize"

_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
_TAG = b'"__type__"'


def _tagged(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return _tagged("datetime", obj.isoformat())
    if isinstance(obj, date):
        return _tagged("date", obj.isoformat())
    if isinstance(obj, time):
        return _tagged("time", obj.isoformat())
    decimal = sys.modules.get("decimal")  # imported late: unless it was, obj is no Decimal
    if decimal is not None and isinstance(obj, decimal.Decimal):
        return _tagged("decimal", str(obj))
    if isinstance(obj, bytes | bytearray | memoryview):
        return _bytes_tag(bytes(obj))
    return _subclass_default(obj)


def _subclass_default(obj: Any) -> Any:
    # Subclasses of the JSON types reach here because of OPT_PASSTHROUGH_SUBCLASS,
    # which we set so that str/int/dict subclasses are not silently truncated.
    for plain in (str, int, float, dict, list, tuple):
        if isinstance(obj, plain):
            return plain(obj)  # type: ignore[arg-type]  # obj is an instance of plain
    json_hook = getattr(obj, "__json__", None)
    if callable(json_hook):
        return json_hook()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _bytes_tag(raw: bytes) -> dict[str, Any]:
    try:
        return _tagged("bytes", raw.decode("utf-8"))
    except UnicodeDecodeError:
        return _tagged("base64", base64.b64encode(raw).decode("ascii"))


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _tag_uuids(obj: Any) -> Any:
    # orjson writes UUIDs as bare strings with no way to intercept them, so tag them first.
    # Most values hold none: look without building anything, and rebuild only if one is found.
    return _retag(obj) if _holds_uuid(obj) else obj


def _holds_uuid(obj: Any) -> bool:
    kind = type(obj)
    if kind in _SCALARS:
        return False
    if kind is tuple or kind is list or isinstance(obj, list | tuple):
        return not _SCALARS.issuperset(map(type, obj)) and any(map(_holds_uuid, obj))
    if kind is dict or isinstance(obj, dict):
        values = obj.values()
        return not _SCALARS.issuperset(map(type, values)) and any(map(_holds_uuid, values))
    return isinstance(obj, uuid.UUID)


def _retag(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return _tagged("uuid", {"hex": obj.hex, "version": obj.version})
    if isinstance(obj, list | tuple):
        return [_retag(item) for item in obj]
    if isinstance(obj, dict):
        return {key: _retag(value) for key, value in obj.items()}
    return obj


def json_dumps(obj: Any) -> bytes:
    """Encode `obj` as JSON bytes, tagging the types JSON lacks as kombu does."""
    return orjson.dumps(_tag_uuids(obj), default=_json_default, option=_ORJSON_OPTIONS)


def json_dumps_task_body(args: Sequence[Any], kwargs: Mapping[str, Any], embed: Mapping[str, Any]) -> bytes:
    """Encode a task body `[args, kwargs, embed]` as `json_dumps` would, without building the list."""
    if type(args) is not tuple and type(args) is not list:
        args = list(args)
    if type(kwargs) is not dict:
        kwargs = dict(kwargs)
    plain = (
        _SCALARS.issuperset(map(type, args))
        and _SCALARS.issuperset(map(type, kwargs.values()))
        and _SCALARS.issuperset(map(type, embed.values()))
    )
    body = (args, kwargs, embed) if plain else (_tag_uuids(args), _tag_uuids(kwargs), _tag_uuids(embed))
    return orjson.dumps(body, default=_json_default, option=_ORJSON_OPTIONS)


def json_dumps_envelope(obj: Any) -> bytes:
    """Encode a document celeriac built itself (an envelope): like `json_dumps`, minus the UUID walk."""
    return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)


def _decimal(text: str) -> Any:
    from decimal import Decimal  # at first use: a worker that never sees one is spared the module

    return Decimal(text)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": _decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]) if isinstance(v, dict) else uuid.UUID(v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v),
}


def _untag(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_untag(item) for item in obj]
    if isinstance(obj, dict):
        if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
            decoder = _DECODERS.get(obj["__type__"])
            if decoder is None:
                raise ProtocolError(f"unknown JSON type tag {obj['__type__']!r}")
            return decoder(obj["__value__"])
        return {key: _untag(value) for key, value in obj.items()}
    return obj


def json_loads(data: bytes | str) -> Any:
    """Decode JSON, turning kombu's type tags back into Python values."""
    value = orjson.loads(data)
    raw = data if isinstance(data, bytes) else data.encode()
    return _untag(value) if raw.find(_TAG) >= 0 else value  # find: `in` takes a slower path for bytes


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)


def _pickle_loads(data: bytes | str) -> Any:
    return pickle.loads(data if isinstance(data, bytes) else data.encode("latin-1"))


@dataclass(frozen=True, slots=True)
class Serializer:
    """One way of turning values into message bodies and back."""

    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes | str], Any]


SERIALIZERS: dict[str, Serializer] = {
    "json": Serializer("json", JSON_TYPE, "utf-8", json_dumps, json_loads),
    "pickle": Serializer("pickle", PICKLE_TYPE, "binary", _pickle_dumps, _pickle_loads),
}
_BY_CONTENT_TYPE = {s.content_type: s for s in SERIALIZERS.values()}


def by_name(name: str) -> Serializer:
    """Return the serializer called `name` (or whose content type is `name`)."""
    found = SERIALIZERS.get(name) or _BY_CONTENT_TYPE.get(name)
    if found is None:
        known = ", ".join(sorted(SERIALIZERS))
        raise ProtocolError(f"unknown serializer {name!r}; known serializers: {known}")
    return found


def content_types(names: Iterable[str]) -> frozenset[str]:
    """Turn `accept_content` entries (names or content types) into content types."""
    return frozenset(by_name(name).content_type for name in names)


def loads(data: bytes | str, content_type: str, accept: frozenset[str]) -> Any:
    """Decode a body of `content_type`, refusing types that are not in `accept`."""
    if content_type not in accept:
        name = _BY_CONTENT_TYPE[content_type].name if content_type in _BY_CONTENT_TYPE else content_type
        raise ContentDisallowed(
            f"refusing content type {content_type!r}: add {name!r} to the accept_content setting to accept it"
        )
    serializer = _BY_CONTENT_TYPE.get(content_type)
    if serializer is None:
        raise ProtocolError(f"no serializer for content type {content_type!r}")
    try:
        return serializer.loads(data)
    except (ValueError, TypeError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
        raise ProtocolError(f"cannot decode {content_type} body: {exc}") from exc
