"""The wire format without a worker: kombu's JSON tags, the envelope, task decoding and stored failures."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from celeriac.exceptions import ContentDisallowed, ProtocolError, SecurityError, TimeLimitExceeded
from celeriac.protocol import serializers
from celeriac.protocol.failures import decode_exception, encode_exception
from celeriac.protocol.message import (
    Envelope,
    TaskMessage,
    decode_task,
    encode_task,
    pack,
    read_task,
    unpack,
)

JSON_ONLY = frozenset({serializers.JSON_TYPE})
JSON = serializers.by_name("json")
PICKLE = serializers.by_name("pickle")


class PaymentDeclined(Exception):
    """A user-defined error, importable by its module and name."""


class Outer:
    class NestedError(ValueError):
        """An error whose qualified name has a dot in it."""


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


def _roundtrip(value: Any) -> Any:
    return serializers.json_loads(serializers.json_dumps(value))


def _raw(value: Any) -> Any:
    """What `json_dumps` wrote, read back with the standard library (no tag decoding)."""
    return json.loads(serializers.json_dumps(value))


def _message(**headers: Any) -> TaskMessage:
    base = {"lang": "py", "task": "proj.add", "id": str(uuid.uuid4()), "retries": 0}
    base.update(headers)
    return TaskMessage(base, [2, 3], {"z": 1}, {"callbacks": None}, {"priority": 0})


# serializers: kombu's JSON tags -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 3, 9, 14, 5, 7, 123456, tzinfo=UTC),
        datetime(2024, 3, 9, 14, 5, 7, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2024, 3, 9, 14, 5, 7, 1),
        date(1999, 12, 31),
        time(23, 59, 58, 999),
        time(6, 0, tzinfo=timezone(timedelta(hours=2))),
        Decimal("12.3400"),
        Decimal("-1E+10"),
        uuid.uuid4(),
        b"plain utf-8 \xc3\xa9",
        b"\xff\xfe\x00binary",
        b"",
    ],
    ids=repr,
)
def test_a_value_json_lacks_comes_back_equal_and_of_the_same_type(value: Any) -> None:
    # Given a value plain JSON has no word for
    # When it is written and read back
    back = _roundtrip(value)
    # Then it is equal and of the very same type (aware stays aware, naive stays naive)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, datetime):
        assert back.utcoffset() == value.utcoffset()


def test_tagged_values_nested_in_lists_dicts_and_tuples_come_back() -> None:
    # Given tagged values buried in containers, tuples included
    ident = uuid.uuid4()
    value = {
        "when": [datetime(2020, 1, 1, tzinfo=UTC), (date(2020, 1, 2), {"deep": (ident, b"\x80")})],
        "amounts": {"total": Decimal("3.50"), "parts": (Decimal("1.25"), Decimal("2.25"))},
        "plain": [1, "two", None, True, 2.5],
    }
    # When the structure is written and read back
    back = _roundtrip(value)
    # Then every value is restored; tuples become lists, as with kombu
    assert back == {
        "when": [datetime(2020, 1, 1, tzinfo=UTC), [date(2020, 1, 2), {"deep": [ident, b"\x80"]}]],
        "amounts": {"total": Decimal("3.50"), "parts": [Decimal("1.25"), Decimal("2.25")]},
        "plain": [1, "two", None, True, 2.5],
    }
    assert isinstance(back["when"][1][1]["deep"][0], uuid.UUID)


_WITHOUT_DECIMAL = """
import sys
import celeriac, celeriac.brokers.redis, celeriac.worker.pools.prefork, celeriac.cli.main
assert "decimal" not in sys.modules, "a worker's modules import decimal"
from celeriac.protocol import serializers
text = b'{"__type__": "decimal", "__value__": "12.3400"}'
value = serializers.json_loads(text)
assert type(value).__name__ == "Decimal" and str(value) == "12.3400", value
assert serializers.json_loads(serializers.json_dumps({"amount": value})) == {"amount": value}
"""


def test_a_worker_loads_decimal_only_when_a_message_holds_one() -> None:
    # Given a fresh interpreter with the modules a Redis prefork worker loads (each process of
    # a worker pays for every module it holds), when a decimal then arrives and is sent on
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DECIMAL], capture_output=True, text=True, timeout=60
    )
    # Then none of those modules had imported decimal, and the value still round-trips
    assert done.returncode == 0, done.stderr


def test_the_raw_json_uses_kombus_exact_tags() -> None:
    # Given one value of each tagged type
    ident = uuid.UUID("6f1c2b5e-8f0a-4d7b-9a3e-2c1d0e9f8a7b")
    value = [
        datetime(2024, 3, 9, 14, 5, 7, 250000, tzinfo=UTC),
        datetime(2024, 3, 9, 14, 5, 7),
        date(2024, 3, 9),
        time(8, 30, 0, 5),
        Decimal("0.10"),
        ident,
        b"caf\xc3\xa9",
        b"\x00\xff",
    ]
    # When it is written
    raw = _raw(value)
    # Then each is a {"__type__", "__value__"} pair exactly as kombu writes it
    assert raw == [
        {"__type__": "datetime", "__value__": "2024-03-09T14:05:07.250000+00:00"},
        {"__type__": "datetime", "__value__": "2024-03-09T14:05:07"},
        {"__type__": "date", "__value__": "2024-03-09"},
        {"__type__": "time", "__value__": "08:30:00.000005"},
        {"__type__": "decimal", "__value__": "0.10"},
        {"__type__": "uuid", "__value__": {"hex": "6f1c2b5e8f0a4d7b9a3e2c1d0e9f8a7b", "version": 4}},
        {"__type__": "bytes", "__value__": "café"},
        {"__type__": "base64", "__value__": base64.b64encode(b"\x00\xff").decode("ascii")},
    ]


def test_a_uuid_tag_written_by_kombu_without_a_version_is_read() -> None:
    # Given a uuid tag in the form older kombu wrote (hex only), and one with a version
    ident = uuid.uuid4()
    older = json.dumps({"__type__": "uuid", "__value__": {"hex": ident.hex}})
    newer = json.dumps({"__type__": "uuid", "__value__": {"hex": ident.hex, "version": 4}})
    # When they are read
    # Then both are the same UUID
    assert serializers.json_loads(older) == ident
    assert serializers.json_loads(newer.encode()) == ident


def test_a_dict_that_looks_like_a_tag_of_an_unknown_type_is_refused() -> None:
    # Given user data shaped like a tag whose type no one registered
    raw = b'{"args": [{"__type__": "frobnicator", "__value__": 1}]}'
    # When it is read
    # Then it is a protocol error naming the tag, not a silent pass-through
    with pytest.raises(ProtocolError, match="frobnicator"):
        serializers.json_loads(raw)


def test_a_dict_with_the_tag_keys_and_more_is_plain_data() -> None:
    # Given a dict with the two tag keys plus a third
    value = {"__type__": "frobnicator", "__value__": 1, "other": 2}
    # When it is written and read back
    # Then it is left alone
    assert _roundtrip(value) == value


def test_an_object_json_cannot_encode_raises_type_error() -> None:
    # Given an object with no JSON form
    # When it is written
    # Then the error is a TypeError, as the caller-facing check expects
    with pytest.raises(TypeError):
        serializers.json_dumps({"f": object()})


def test_content_outside_accept_is_refused_with_the_setting_named() -> None:
    # Given a pickled body and a reader that accepts only JSON
    body = PICKLE.dumps([[1], {}, {}])
    # When it is decoded
    with pytest.raises(ContentDisallowed) as caught:
        serializers.loads(body, serializers.PICKLE_TYPE, JSON_ONLY)
    # Then the refusal says which setting to change and what to add
    assert "accept_content" in str(caught.value)
    assert "pickle" in str(caught.value)
    assert isinstance(caught.value, ProtocolError)


def test_accepted_content_is_decoded() -> None:
    # Given a reader that accepts JSON and pickle
    accept = serializers.content_types(["json", "pickle"])
    # When bodies of both types are decoded
    # Then both come back
    assert serializers.loads(PICKLE.dumps({"a": (1, 2)}), serializers.PICKLE_TYPE, accept) == {"a": (1, 2)}
    assert serializers.loads(b'{"a": [1, 2]}', serializers.JSON_TYPE, accept) == {"a": [1, 2]}


def test_an_unknown_content_type_is_refused_even_if_listed_as_accepted() -> None:
    # Given a content type no serializer handles, whitelisted anyway
    accept = frozenset({"application/x-yaml"})
    # When a body of that type is decoded
    # Then it is a protocol error, not a crash
    with pytest.raises(ProtocolError, match="application/x-yaml"):
        serializers.loads(b"a: 1", "application/x-yaml", accept)


def test_a_corrupt_body_of_an_accepted_type_is_a_protocol_error() -> None:
    # Given JSON that is cut short, and a pickle that is truncated
    # When they are decoded
    # Then both are protocol errors
    with pytest.raises(ProtocolError):
        serializers.loads(b'[[1], {"a":', serializers.JSON_TYPE, JSON_ONLY)
    accept = serializers.content_types(["pickle"])
    with pytest.raises(ProtocolError):
        serializers.loads(PICKLE.dumps([1, 2, 3])[:-3], serializers.PICKLE_TYPE, accept)


def test_an_unknown_serializer_name_lists_the_known_ones() -> None:
    # Given a serializer name that does not exist
    # When it is looked up
    # Then the error lists what exists
    with pytest.raises(ProtocolError, match="json, pickle"):
        serializers.by_name("yaml")


# pack / unpack: the kombu envelope ----------------------------------------------------------


def test_pack_writes_kombus_envelope() -> None:
    # Given a task message encoded as JSON
    message = _message()
    envelope = encode_task(message, JSON)
    # When it is packed for queue "celery"
    document = json.loads(pack(envelope, routing_key="celery"))
    # Then it has exactly kombu's keys, with the body base64-encoded
    assert set(document) == {"body", "content-encoding", "content-type", "headers", "properties"}
    assert document["content-type"] == "application/json"
    assert document["content-encoding"] == "utf-8"
    assert json.loads(base64.b64decode(document["body"])) == [[2, 3], {"z": 1}, {"callbacks": None}]
    assert document["headers"] == dict(message.headers)
    properties = document["properties"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "celery"}
    assert properties["body_encoding"] == "base64"
    assert uuid.UUID(properties["delivery_tag"]).version == 4
    assert properties["priority"] == 0


def test_every_pack_gets_a_fresh_delivery_tag() -> None:
    # Given one envelope
    envelope = encode_task(_message(), JSON)
    # When it is packed twice
    tags = {json.loads(pack(envelope, routing_key="q"))["properties"]["delivery_tag"] for _ in range(2)}
    # Then the two delivery tags differ
    assert len(tags) == 2


def test_unpack_then_decode_gives_back_the_message() -> None:
    # Given a packed message with tagged arguments
    when = datetime(2030, 1, 1, tzinfo=UTC)
    original = TaskMessage(
        {"task": "proj.add", "id": "abc", "eta": when.isoformat()}, [when, Decimal("1.5")], {"k": b"v"}
    )
    raw = pack(encode_task(original, JSON), routing_key="celery")
    # When it is unpacked and decoded
    envelope = unpack(raw)
    decoded = decode_task(envelope, JSON_ONLY)
    # Then the same call comes out
    assert decoded.name == "proj.add" and decoded.id == "abc"
    assert list(decoded.args) == [when, Decimal("1.5")]
    assert dict(decoded.kwargs) == {"k": b"v"}
    assert decoded.eta == when
    assert envelope.properties["delivery_info"]["routing_key"] == "celery"


def test_a_pickled_message_travels_in_the_same_envelope() -> None:
    # Given a message pickled by a producer
    raw = pack(encode_task(_message(), PICKLE), routing_key="celery")
    document = json.loads(raw)
    # When it is unpacked
    # Then the envelope names pickle, and a JSON-only reader refuses it
    assert document["content-type"] == "application/x-python-serialize"
    assert document["content-encoding"] == "binary"
    with pytest.raises(ContentDisallowed):
        decode_task(unpack(raw), JSON_ONLY)
    decoded = decode_task(unpack(raw), serializers.content_types(["json", "pickle"]))
    assert list(decoded.args) == [2, 3]


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json{",
        b"\xff\xfe\x00",
        b"",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"headers": {}}',
        b'{"body": "***not base64***", "properties": {"body_encoding": "base64"}}',
        b'{"body": "e30=", "properties": {"body_encoding": "base64"}, "x": {"__type__": "nope", '
        b'"__value__": 0}}',
    ],
    ids=repr,
)
def test_unpack_of_garbage_raises_protocol_error(garbage: bytes) -> None:
    # Given bytes that are not a kombu envelope
    # When they are unpacked
    # Then it is a protocol error
    with pytest.raises(ProtocolError):
        unpack(garbage)


def test_a_body_without_base64_encoding_is_read_as_text() -> None:
    # Given an envelope whose body is inline JSON text (no body_encoding)
    raw = json.dumps({"body": "[[1], {}, {}]", "headers": {"task": "t", "id": "i"}}).encode()
    # When it is unpacked
    envelope = unpack(raw)
    # Then the body is that text, and the defaults fill the content type and encoding
    assert envelope.body == b"[[1], {}, {}]"
    assert envelope.content_type == "application/json"
    assert envelope.content_encoding == "utf-8"
    assert list(decode_task(envelope, JSON_ONLY).args) == [1]


def test_decoding_v1_style_headers_raises_protocol_error() -> None:
    # Given a protocol v1 message: the task name lives in the body, headers lack 'task'
    body = json.dumps({"task": "proj.add", "id": "x", "args": [1, 2], "kwargs": {}}).encode()
    envelope = Envelope(body, serializers.JSON_TYPE, "utf-8", {}, {})
    # When it is decoded
    # Then it is refused as not protocol v2
    with pytest.raises(ProtocolError, match="protocol v2"):
        decode_task(envelope, JSON_ONLY)


@pytest.mark.parametrize(
    "body",
    [b'{"args": []}', b"[[1], {}]", b"[1, 2, 3, 4]", b'[{"a": 1}, {}, {}]', b"[[1], [2], {}]", b"42"],
    ids=repr,
)
def test_a_body_that_is_not_args_kwargs_embed_raises_protocol_error(body: bytes) -> None:
    # Given v2 headers and a body of the wrong shape
    envelope = Envelope(body, serializers.JSON_TYPE, "utf-8", {"task": "t", "id": "i"}, {})
    # When it is decoded
    # Then it is a protocol error
    with pytest.raises(ProtocolError):
        decode_task(envelope, JSON_ONLY)


@pytest.mark.parametrize(
    ("headers", "properties"),
    [
        ({"eta": "next tuesday"}, {}),
        ({"expires": 12}, {}),
        ({"timelimit": 5}, {}),
        ({"timelimit": ["soon", None]}, {}),
        ({"retries": "many"}, {}),
        ({}, {"priority": "urgent"}),
    ],
    ids=repr,
)
def test_a_malformed_header_the_worker_acts_on_is_refused_at_decoding(
    headers: dict[str, Any], properties: dict[str, Any]
) -> None:
    # Given a v2 message with one header or property of the wrong shape
    envelope = Envelope(
        b"[[1], {}, {}]", serializers.JSON_TYPE, "utf-8", {"task": "t", "id": "i", **headers}, properties
    )
    # When it is decoded
    # Then it is a protocol error now, not a crash when the worker reads the header later
    with pytest.raises(ProtocolError):
        decode_task(envelope, JSON_ONLY)


def test_an_embed_that_is_not_an_object_is_refused() -> None:
    # Given a body whose embed is a list
    envelope = Envelope(b"[[1], {}, [1]]", serializers.JSON_TYPE, "utf-8", {"task": "t", "id": "i"}, {})
    # When it is decoded
    # Then it is a protocol error naming embed
    with pytest.raises(ProtocolError, match="embed"):
        decode_task(envelope, JSON_ONLY)


@pytest.mark.parametrize("field", ["headers", "properties"])
@pytest.mark.parametrize("value", ["oops", ["task", "id"], 7])
def test_an_envelope_whose_headers_or_properties_are_not_objects_is_refused(field: str, value: Any) -> None:
    # Given an envelope whose headers or properties are not JSON objects
    document: dict[str, Any] = {
        "body": "W1sxXSx7fSx7fV0=",
        "headers": {"task": "t", "id": "i"},
        "properties": {},
    }
    document[field] = value
    # When it is unpacked
    # Then it is a protocol error
    with pytest.raises(ProtocolError, match="headers and properties"):
        unpack(json.dumps(document))


def test_a_null_embed_becomes_an_empty_mapping() -> None:
    # Given a Celery message whose embed is null
    envelope = Envelope(b"[[1], {}, null]", serializers.JSON_TYPE, "utf-8", {"task": "t", "id": "i"}, {})
    # When it is decoded
    # Then embed is empty, not None
    assert dict(decode_task(envelope, JSON_ONLY).embed) == {}


def _outcome(read: Any) -> Any:
    """What reading gives: the message's fields, or the error's type and words."""
    try:
        message = read()
    except (ProtocolError, ContentDisallowed) as exc:
        return type(exc), str(exc)
    fields = (message.headers, message.args, message.kwargs, message.embed, message.properties)
    return tuple(dict(field) if isinstance(field, dict) else list(field) for field in fields)


_WHEN = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "headers", "properties", "accept"),
    [
        (b'[[1, "a"], {"k": 2}, {"callbacks": null, "chain": null}]', {}, {}, JSON_ONLY),
        (serializers.json_dumps([[_WHEN, Decimal("1.5")], {"b": b"v"}, None]), {}, {}, JSON_ONLY),
        (b"[[1], {}, null]", {"eta": _WHEN.isoformat(), "timelimit": [10, 5]}, {"priority": 3}, JSON_ONLY),
        (b"[[1], {}, {}]", {}, {}, frozenset({serializers.PICKLE_TYPE})),
        (b"[[1], {}]", {}, {}, JSON_ONLY),
        (b"[[1], {}, [1]]", {}, {}, JSON_ONLY),
        (b"[[1], [2], {}]", {}, {}, JSON_ONLY),
        (b"{not json", {}, {}, JSON_ONLY),
        (b"[[1], {}, {}]", {"retries": "many"}, {}, JSON_ONLY),
        (b"[[1], {}, {}]", {"eta": "next tuesday"}, {}, JSON_ONLY),
        (b"[[1], {}, {}]", {"task": None}, {"priority": "urgent"}, JSON_ONLY),
    ],
    ids=repr,
)
def test_read_task_gives_what_unpack_and_decode_give(
    body: bytes, headers: dict[str, Any], properties: dict[str, Any], accept: frozenset[str]
) -> None:
    # Given a packed JSON message, well formed or not, and the content types a worker accepts
    envelope = Envelope(body, serializers.JSON_TYPE, "utf-8", {"task": "t", "id": "i", **headers}, properties)
    raw = pack(envelope, routing_key="celery")
    # When the worker's one-pass reader reads it
    # Then it gives the same message, or the same error in the same words, as the general way
    assert _outcome(lambda: read_task(raw, accept)) == _outcome(lambda: decode_task(unpack(raw), accept))


@pytest.mark.parametrize(
    "document",
    [
        {"body": "[[1], {}, {}]", "headers": {"task": "t", "id": "i"}},  # inline text, no encoding
        {"body": "W1sxXSx7fSx7fV0=", "headers": {"id": "i"}, "properties": {"body_encoding": "base64"}},
        {"body": "***", "headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}},
        {"body": "W1sxXSx7fSx7fV0=", "headers": ["task"], "properties": {}},
        {"headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}},
    ],
    ids=repr,
)
def test_read_task_of_an_unusual_envelope_takes_the_general_way(document: dict[str, Any]) -> None:
    # Given envelopes that are not the usual base64 JSON body, or are broken
    raw = json.dumps(document).encode()
    # When the worker's reader reads one
    # Then the outcome is the general way's
    assert _outcome(lambda: read_task(raw, JSON_ONLY)) == _outcome(
        lambda: decode_task(unpack(raw), JSON_ONLY)
    )


def test_read_task_of_a_pickled_message_decodes_it_where_pickle_is_accepted() -> None:
    # Given a message pickled by a producer
    raw = pack(encode_task(_message(), PICKLE), routing_key="celery")
    # When a worker reads it, refusing pickle and then accepting it
    # Then it is refused with the setting named, and then read
    with pytest.raises(ContentDisallowed, match="accept_content"):
        read_task(raw, JSON_ONLY)
    assert list(read_task(raw, serializers.content_types(["json", "pickle"])).args) == [2, 3]


def test_header_accessors_read_celerys_conventions() -> None:
    # Given headers as Celery sends them: timelimit is [hard, soft], eta is ISO-8601
    message = _message(timelimit=[30, 10], retries=2, eta="2030-01-01T00:00:00+00:00", expires=None)
    # When they are read
    # Then the hard limit comes first and times are parsed
    assert message.timelimit == (30, 10)
    assert message.retries == 2
    assert message.eta == datetime(2030, 1, 1, tzinfo=UTC)
    assert message.expires is None


def test_a_header_time_that_is_not_iso_8601_raises_protocol_error() -> None:
    # Given an eta header that is not a time
    message = _message(eta="next tuesday")
    # When it is read
    # Then it is a protocol error
    with pytest.raises(ProtocolError, match="next tuesday"):
        _ = message.eta


# failures: exceptions as stored results -----------------------------------------------------


def test_a_builtin_exception_roundtrips() -> None:
    # Given a builtin exception with several arguments
    stored = encode_exception(KeyError("missing", 42))
    # When it is encoded and decoded
    back = decode_exception(stored)
    # Then the stored form is Celery's and the same exception comes back
    assert stored == {"exc_type": "KeyError", "exc_message": ["missing", 42], "exc_module": "builtins"}
    assert type(back) is KeyError
    assert back.args == ("missing", 42)


def test_a_custom_exception_roundtrips_by_module_and_name() -> None:
    # Given a user-defined exception importable from this module
    stored = encode_exception(PaymentDeclined("card expired"))
    # When it is encoded and decoded
    back = decode_exception(stored)
    # Then it names its module and comes back as the same class
    assert stored["exc_module"] == __name__
    assert stored["exc_type"] == "PaymentDeclined"
    assert type(back) is PaymentDeclined
    assert str(back) == "card expired"


def test_a_nested_exception_class_is_found_by_its_dotted_name() -> None:
    # Given an exception class defined inside another class
    stored = encode_exception(Outer.NestedError("bad"))
    # When it is encoded and decoded
    back = decode_exception(stored)
    # Then the qualified name leads back to it
    assert stored["exc_type"] == "Outer.NestedError"
    assert type(back) is Outer.NestedError


def test_an_exception_whose_init_wants_other_arguments_keeps_type_and_message() -> None:
    # Given an exception whose constructor cannot take its own args back
    stored = encode_exception(NeedsTwoArguments(402, "payment required"))
    # When it is decoded
    back = decode_exception(stored)
    # Then the type and the message survive
    assert type(back) is NeedsTwoArguments
    assert back.args == ("402: payment required",)


def test_arguments_json_cannot_hold_are_stored_as_their_repr() -> None:
    # Given an exception carrying an object as an argument
    marker = object()
    # When it is encoded
    stored = encode_exception(ValueError("bad", marker))
    # Then the stored form is JSON-safe
    assert stored["exc_message"] == ["bad", repr(marker)]
    json.dumps(stored)


def test_celeriacs_time_limit_exceeded_is_stored_under_celerys_module() -> None:
    # Given celeriac's TimeLimitExceeded
    stored = encode_exception(TimeLimitExceeded(5.0))
    # When it is encoded and decoded
    back = decode_exception(stored)
    # Then a Celery client sees celery.exceptions, and celeriac gets its own class back
    assert stored == {
        "exc_type": "TimeLimitExceeded",
        "exc_message": [5.0],
        "exc_module": "celery.exceptions",
    }
    assert type(back) is TimeLimitExceeded
    assert back.args == (5.0,)


def test_a_failure_stored_by_celery_decodes_to_celeriacs_class() -> None:
    # Given a failure as a Celery worker stores it
    stored = {"exc_type": "TimeLimitExceeded", "exc_message": [30], "exc_module": "celery.exceptions"}
    # When it is decoded without Celery installed
    # Then celeriac's own class stands in
    assert isinstance(decode_exception(stored), TimeLimitExceeded)


@pytest.mark.parametrize(
    ("module", "name"),
    [("no_such_module_anywhere.errors", "QuotaExceeded"), ("json", "NoSuchError"), ("os", "path.Nope")],
)
def test_an_unknown_exception_becomes_a_stand_in_with_its_name(module: str, name: str) -> None:
    # Given a failure naming a class this process cannot find
    stored = {"exc_type": name, "exc_message": ["over quota"], "exc_module": module}
    # When it is decoded
    back = decode_exception(stored)
    # Then a synthesized exception with that name and message comes back
    assert isinstance(back, Exception)
    assert type(back).__name__ == name.rsplit(".", 1)[-1]
    assert type(back).__module__ == module
    assert back.args == ("over quota",)


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("builtins", "object")],
)
def test_a_stored_failure_naming_a_non_exception_raises_security_error(module: str, name: str) -> None:
    # Given a stored failure pointing at something that is not an exception class
    stored = {"exc_type": name, "exc_message": ["echo pwned"], "exc_module": module}
    # When it is decoded
    # Then nothing is called: it is a security error
    with pytest.raises(SecurityError, match=name):
        decode_exception(stored)


def test_old_style_and_odd_failures_still_decode() -> None:
    # Given a bare string message (old senders), a string exc_message, and a missing one
    # When they are decoded
    # Then each gives a usable exception
    assert str(decode_exception("it broke")) == "it broke"
    single = decode_exception({"exc_type": "ValueError", "exc_message": "one", "exc_module": "builtins"})
    assert type(single) is ValueError and single.args == ("one",)
    empty = decode_exception({"exc_type": "RuntimeError", "exc_module": "builtins"})
    assert type(empty) is RuntimeError and empty.args == ()
