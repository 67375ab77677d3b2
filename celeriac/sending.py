"""From a task call to bytes on a queue: build the protocol v2 message, route it, publish it."""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from celeriac.brokers.base import Broker, Outgoing, clamp_priority
from celeriac.exceptions import OperationalError
from celeriac.protocol import serializers
from celeriac.protocol.message import (
    EnvelopeTemplate,
    TaskMessage,
    encode_task,
    pack,
    short_repr,
    template_marker,
)

PROTOCOL_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "redelivered",
        "compression",
    }
)
logger = logging.getLogger("celeriac.sending")
_json = orjson.dumps  # for header values celeriac made itself: strings, ints and None
ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def as_utc(when: datetime, assume_utc: bool) -> datetime:
    """Give a naive time a zone: UTC when `enable_utc`, else the machine's local zone."""
    if when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC) if assume_utc else when.astimezone()


def resolve_eta(countdown: float | None, eta: datetime | None, assume_utc: bool) -> datetime | None:
    """Turn `countdown` or `eta` into an aware time, or None for "now"."""
    if countdown is not None:
        return datetime.now(UTC) + timedelta(seconds=float(countdown))
    return as_utc(eta, assume_utc) if eta is not None else None


def resolve_expires(expires: float | datetime | str | None, assume_utc: bool) -> datetime | None:
    """Turn `expires` (seconds from now, a time, or an ISO time as a retry resends it) into an aware time."""
    if expires is None:
        return None
    if isinstance(expires, str):  # a running task's request.expires is the header's ISO string
        expires = datetime.fromisoformat(expires)
    if isinstance(expires, datetime):
        return as_utc(expires, assume_utc)
    return datetime.now(UTC) + timedelta(seconds=float(expires))


def build_headers(
    *,
    name: str,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    eta: datetime | None,
    expires: datetime | None,
    retries: int,
    timelimit: tuple[float | None, float | None],
    root_id: str | None,
    parent_id: str | None,
    group_id: str | None,
    group_index: int | None,
    ignore_result: bool,
    shadow: str | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Lay out protocol v2 headers exactly as Celery 5 sends them."""
    headers = _header_layout(
        name=name,
        task_id=task_id,
        shadow=shadow,
        eta=eta.isoformat() if eta else None,
        expires=expires.isoformat() if expires else None,
        group_id=group_id,
        group_index=group_index,
        retries=retries,
        timelimit=timelimit,
        root_id=root_id or task_id,
        parent_id=parent_id,
        argsrepr=short_repr(tuple(args)),
        kwargsrepr=short_repr(dict(kwargs)),
        ignore_result=ignore_result,
    )
    if extra:
        headers.update({key: value for key, value in extra.items() if key not in ("task", "id")})
    return headers


def _header_layout(
    *,
    name: str,
    task_id: str,
    shadow: str | None,
    eta: str | None,
    expires: str | None,
    group_id: str | None,
    group_index: int | str | None,
    retries: int,
    timelimit: tuple[float | None, float | None],
    root_id: str,
    parent_id: str | None,
    argsrepr: str,
    kwargsrepr: str,
    ignore_result: bool,
) -> dict[str, Any]:
    # The one place that orders the headers: messages and envelope templates both use it.
    return {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta,
        "expires": expires,
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [timelimit[0], timelimit[1]],
        "root_id": root_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": ORIGIN,
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def _properties(task_id: str, reply_to: str, priority: int | None) -> dict[str, Any]:
    return {
        "correlation_id": task_id,
        "reply_to": reply_to,
        "delivery_mode": 2,
        "priority": priority or 0,
    }


def explain_unserialisable(
    target: Callable[..., Any] | None,
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    serializer: serializers.Serializer,
) -> TypeError:
    """Find the argument `serializer` cannot encode and say which one it is and why."""
    names = _parameter_names(target)
    for index, value in enumerate(args):
        reason = _refusal(serializer, value)
        if reason is not None:
            label = f"argument {index}" + (f" ({names[index]!r})" if index < len(names) else "")
            return TypeError(_message(name, label, value, serializer, reason))
    for key, value in kwargs.items():
        reason = _refusal(serializer, value)
        if reason is not None:
            return TypeError(_message(name, f"keyword argument {key!r}", value, serializer, reason))
    return TypeError(f"cannot serialise the arguments of task {name!r} with {serializer.name}")


def _parameter_names(target: Callable[..., Any] | None) -> list[str]:
    if target is None:
        return []
    function: Any = getattr(target, "__wrapped__", None) or getattr(target, "run", target)
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []
    bound = bool(parameters) and parameters[0] == "self" and getattr(type(target), "run", None) is function
    return parameters[1:] if bound else parameters


def _refusal(serializer: serializers.Serializer, value: Any) -> str | None:
    try:
        serializer.dumps(value)
    except (TypeError, ValueError) as exc:
        return str(exc)
    except Exception as exc:  # pickle raises a variety of errors for what it cannot pickle
        return f"{type(exc).__name__}: {exc}"
    return None


def _message(name: str, label: str, value: Any, serializer: serializers.Serializer, reason: str) -> str:
    return (
        f"cannot send task {name!r}: {label} has type {type(value).__name__}, "
        f"which the {serializer.name} serializer cannot encode ({reason}); "
        "pass plain data (str, int, float, bool, None, list, dict, datetime, Decimal, UUID, bytes) instead"
    )


class Router:
    """Chooses a queue for a task name from `task_routes` (dicts with globs or regexes, or callables)."""

    def __init__(self, routes: Any, default_queue: str) -> None:
        self.source = routes
        self.default_queue = default_queue
        if routes is None:
            self.routes: list[Any] = []
        elif isinstance(routes, list | tuple):
            self.routes = list(routes)
        else:
            self.routes = [routes]

    def queue_for(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Return the queue a task named `name` goes to when the caller named none."""
        for route in self.routes:
            found = self._match(route, name, args, kwargs)
            if found:
                return found
        return self.default_queue

    def _match(self, route: Any, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
        if callable(route):
            return _queue_of(route(name, args, kwargs, {}))
        for pattern, target in dict(route).items():
            if isinstance(pattern, re.Pattern):
                if pattern.match(name):
                    return _queue_of(target)
            elif fnmatch.fnmatchcase(name, pattern):
                return _queue_of(target)
        return None


def _queue_of(target: Any) -> str | None:
    if target is None:
        return None
    if isinstance(target, str):
        return target
    queue = dict(target).get("queue")
    return getattr(queue, "name", queue)


@dataclass(slots=True)
class Call:
    """One task call with its options, before it becomes a message.

    Treat it as immutable (`child_of` and `dataclasses.replace` make changed copies); it is
    not declared frozen because a frozen dataclass of this size costs several microseconds
    to build, on the path of every `delay()`.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_id: str = ""
    countdown: float | None = None
    eta: datetime | None = None
    expires: float | datetime | str | None = None
    queue: str | None = None
    priority: int | None = None
    headers: Mapping[str, Any] | None = None
    ignore_result: bool | None = None
    serializer: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    link: Any = None
    link_error: Any = None
    shadow: str | None = None
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    group_index: int | None = None
    chain: Sequence[Any] | None = None
    chord: Any = None

    def child_of(self, root_id: str, parent_id: str) -> Call:
        """The same call, sent from inside the task `parent_id` of the workflow `root_id`."""
        return replace(self, root_id=self.root_id or root_id, parent_id=self.parent_id or parent_id)


def build_message(call: Call, conf: Mapping[str, Any], reply_to: str) -> tuple[TaskMessage, datetime | None]:
    """Lay out the protocol v2 message for `call`; return it with its eta (`conf`: see `send_settings`)."""
    utc = bool(conf["enable_utc"])
    eta = resolve_eta(call.countdown, call.eta, utc)
    ignore = call.ignore_result if call.ignore_result is not None else conf["task_ignore_result"]
    priority = call.priority if call.priority is not None else conf["task_default_priority"]
    headers = build_headers(
        name=call.name,
        task_id=call.task_id,
        args=call.args,
        kwargs=call.kwargs,
        eta=eta,
        expires=resolve_expires(call.expires, utc),
        retries=call.retries,
        timelimit=(call.time_limit, call.soft_time_limit),
        root_id=call.root_id,
        parent_id=call.parent_id,
        group_id=call.group_id,
        group_index=call.group_index,
        ignore_result=bool(ignore),
        shadow=call.shadow,
        extra=call.headers,
    )
    embed = {
        "callbacks": _signature_list(call.link),
        "errbacks": _signature_list(call.link_error),
        "chain": list(call.chain) if call.chain else None,
        "chord": call.chord,
    }
    properties = _properties(call.task_id, reply_to, priority)
    return TaskMessage(headers, call.args, dict(call.kwargs), embed, properties), eta


def _signature_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    return [dict(item) for item in items]


def outgoing(
    message: TaskMessage, *, queue: str, serializer: serializers.Serializer, eta: datetime | None
) -> Outgoing:
    """Serialise `message` for `queue`, delayed until `eta` when given."""
    payload = pack(encode_task(message, serializer), routing_key=queue)
    when = eta.timestamp() if eta is not None else None
    return Outgoing(queue, payload, clamp_priority(message.priority), when)


# Fast composition: one envelope template per kind of call ---------------------------------


_SEND_SETTINGS = ("enable_utc", "task_ignore_result", "task_default_priority", "task_serializer")


def send_settings(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The settings messages are built from, read once for a batch of them.

    `build_message`, `Composer.compose` and `Celery.prepare` read settings by item (which
    is several times cheaper than by attribute on `Settings`), from the app's settings or
    from this snapshot of them.
    """
    return {name: conf[name] for name in _SEND_SETTINGS}


# The per-message values of a template, in the order they appear in the packed envelope.
_SLOTS = (
    "id",
    "eta",
    "expires",
    "group",
    "group_index",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "correlation_id",
)
_NULL = b"null"
_EMPTY_REPR = b'"{}"'
_EMPTY_EMBED: Mapping[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_TEMPLATES_KEPT = 512


class Composer:
    """Turns calls into packed messages, byte for byte as `outgoing(build_message(...))` does.

    Calls to one task with the same options differ only in ids, arguments and a few headers,
    so each kind of call gets an `EnvelopeTemplate` made once, and a message costs little
    more than serialising its arguments. Calls with custom headers take the general path.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple[Any, ...], EnvelopeTemplate] = {}

    def compose(
        self,
        call: Call,
        *,
        conf: Mapping[str, Any],
        reply_to: str,
        serializer: serializers.Serializer,
        queue: str,
    ) -> Outgoing:
        """Serialise `call` for `queue`; `conf` is the app's settings or `send_settings` of them.

        Raises:
            TypeError: An argument (or a signature in the embed) cannot be serialised.
        """
        if call.headers:
            message, eta = build_message(call, conf, reply_to)
            return outgoing(message, queue=queue, serializer=serializer, eta=eta)
        eta = expires = None
        if call.countdown is not None or call.eta is not None:
            eta = resolve_eta(call.countdown, call.eta, bool(conf["enable_utc"]))
        if call.expires is not None:
            expires = resolve_expires(call.expires, bool(conf["enable_utc"]))
        ignore = call.ignore_result if call.ignore_result is not None else conf["task_ignore_result"]
        priority = call.priority if call.priority is not None else conf["task_default_priority"]
        template = self._template(call, bool(ignore), priority, queue, serializer, reply_to)
        body = encode_body(serializer, call.args, call.kwargs, _embed(call))
        payload = template.fill(body, _slot_values(call, eta, expires))
        return Outgoing(queue, payload, clamp_priority(priority), eta.timestamp() if eta else None)

    def _template(
        self,
        call: Call,
        ignore: bool,
        priority: int | None,
        queue: str,
        serializer: serializers.Serializer,
        reply_to: str,
    ) -> EnvelopeTemplate:
        hard, soft, retries = call.time_limit, call.soft_time_limit, call.retries
        # Types as well as values: 30 and 30.0 are equal keys but different JSON.
        key = (
            call.name,
            call.shadow,
            retries,
            type(retries),
            hard,
            type(hard),
            soft,
            type(soft),
            ignore,
            priority,
            type(priority),
            queue,
            serializer.name,
            reply_to,
        )
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= _TEMPLATES_KEPT:
                self._templates.clear()
            template = self._templates[key] = _compile_template(
                call, ignore, priority, queue, serializer, reply_to
            )
        return template


def _compile_template(
    call: Call,
    ignore: bool,
    priority: int | None,
    queue: str,
    serializer: serializers.Serializer,
    reply_to: str,
) -> EnvelopeTemplate:
    mark = template_marker
    headers = _header_layout(
        name=call.name,
        task_id=mark("id"),
        shadow=call.shadow,
        eta=mark("eta"),
        expires=mark("expires"),
        group_id=mark("group"),
        group_index=mark("group_index"),
        retries=call.retries,
        timelimit=(call.time_limit, call.soft_time_limit),
        root_id=mark("root_id"),
        parent_id=mark("parent_id"),
        argsrepr=mark("argsrepr"),
        kwargsrepr=mark("kwargsrepr"),
        ignore_result=ignore,
    )
    return EnvelopeTemplate.compile(
        slots=_SLOTS,
        headers=headers,
        properties=_properties(mark("correlation_id"), reply_to, priority),
        content_type=serializer.content_type,
        content_encoding=serializer.content_encoding,
        routing_key=queue,
    )


def _embed(call: Call) -> Mapping[str, Any]:
    if call.link is None and call.link_error is None and not call.chain and call.chord is None:
        return _EMPTY_EMBED
    return {
        "callbacks": _signature_list(call.link),
        "errbacks": _signature_list(call.link_error),
        "chain": list(call.chain) if call.chain else None,
        "chord": call.chord,
    }


def encode_body(
    serializer: serializers.Serializer,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    embed: Mapping[str, Any],
) -> bytes:
    """Serialise a task body `[args, kwargs, embed]` as `encode_task` does."""
    if serializer.dumps is serializers.json_dumps:  # JSON writes tuples as lists: no copies needed
        return serializers.json_dumps_task_body(args, kwargs, embed)
    return serializer.dumps([list(args), dict(kwargs), dict(embed)])


def _slot_values(call: Call, eta: datetime | None, expires: datetime | None) -> tuple[bytes, ...]:
    task_id = _json(call.task_id)
    kwargs = call.kwargs
    return (
        task_id,
        _NULL if eta is None else _json(eta.isoformat()),
        _NULL if expires is None else _json(expires.isoformat()),
        _NULL if call.group_id is None else _json(call.group_id),
        _NULL if call.group_index is None else _json(call.group_index),
        _json(call.root_id) if call.root_id else task_id,
        _NULL if call.parent_id is None else _json(call.parent_id),
        _json(short_repr(call.args if type(call.args) is tuple else tuple(call.args))),
        _json(short_repr(kwargs if type(kwargs) is dict else dict(kwargs))) if kwargs else _EMPTY_REPR,
        task_id,
    )


def publish_with_retry(broker: Broker, messages: Sequence[Outgoing], conf: Any) -> None:
    """Publish, retrying a broker outage per `task_publish_retry` and its policy (Celery's defaults)."""
    try:
        broker.publish(messages)
    except OperationalError as exc:
        _publish_again(broker, messages, conf, exc)


def _publish_again(broker: Broker, messages: Sequence[Outgoing], conf: Any, first: OperationalError) -> None:
    policy = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.2}
    policy.update(conf.task_publish_retry_policy or {})
    retries = int(policy["max_retries"]) if conf.task_publish_retry else 0
    pause = float(policy["interval_start"])
    failure = first
    for attempt in range(1, retries + 2):
        if attempt > retries:
            raise OperationalError(
                f"could not publish to the broker after {attempt} attempts: {failure}"
            ) from failure
        logger.warning("Broker unreachable while publishing (%s); retrying in %.2fs", failure, pause)
        time.sleep(pause)
        pause = min(pause + float(policy["interval_step"]), float(policy["interval_max"]))
        try:
            broker.publish(messages)
            return
        except OperationalError as exc:
            failure = exc
