"""The app object without a worker: settings, task naming, in-process calls, and the message it sends."""

from __future__ import annotations

import base64
import gc
import json
import pickle
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, EagerResult, states
from celeriac.brokers.base import Delivery
from celeriac.protocol.message import TaskMessage, decode_task, unpack


@pytest.fixture
def app() -> Iterator[Celery]:
    """An app on a memory broker of its own, so no other test's messages are in its queues."""
    made = Celery("t", broker=f"memory://{uuid.uuid4().hex}")
    yield made
    made.close()


def fetch_one(app: Celery, queue: str = "celery") -> Delivery:
    """Take the one message waiting in `queue`, raw, as a worker would receive it."""
    deliveries = app.broker.fetch([queue], 1, 1)
    assert len(deliveries) == 1, f"expected one message in {queue!r}"
    return deliveries[0]


def decode(app: Celery, delivery: Delivery) -> TaskMessage:
    return decode_task(unpack(delivery.payload), app.accept_content)


# settings ------------------------------------------------------------------------------


def test_settings_read_the_same_through_attributes_and_items(app: Celery) -> None:
    # Given an app whose settings are changed once by attribute and once by item
    app.conf.task_default_queue = "work"
    app.conf["task_serializer"] = "pickle"

    # Then each change reads back the same both ways
    assert app.conf["task_default_queue"] == app.conf.task_default_queue == "work"
    assert app.conf.task_serializer == app.conf["task_serializer"] == "pickle"
    assert "task_acks_late" in app.conf
    # And a setting that does not exist is an AttributeError by attribute, a KeyError by item
    with pytest.raises(AttributeError, match="no_such_setting"):
        _ = app.conf.no_such_setting
    with pytest.raises(KeyError):
        _ = app.conf["no_such_setting"]


def test_a_fresh_app_has_celerys_defaults() -> None:
    # Given an app configured with nothing but a broker
    fresh = Celery("t", broker="memory://defaults", set_as_current=False)

    # Then its settings are Celery's defaults
    conf = fresh.conf
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 4
    assert conf.result_expires == timedelta(days=1)
    assert conf.enable_utc is True
    assert conf.task_acks_late is False
    assert conf.task_always_eager is False
    assert conf.result_backend is None


def test_an_unknown_setting_warns_with_the_closest_known_name(app: Celery) -> None:
    # When a setting name is misspelt by attribute, by item, or as a constructor keyword
    with pytest.warns(UserWarning, match=r"unknown setting 'task_ack_late'; did you mean 'task_acks_late'"):
        app.conf.task_ack_late = True
    with pytest.warns(UserWarning, match=r"did you mean 'worker_prefetch_multiplier'"):
        app.conf["worker_prefetch_multiplyer"] = 1
    with pytest.warns(UserWarning, match=r"did you mean 'result_expires'"):
        Celery("t", broker="memory://typo", set_as_current=False, result_expire=5)

    # Then the value is still kept under the name given, and the real setting is untouched
    assert app.conf.task_ack_late is True
    assert app.conf.task_acks_late is False


def test_a_known_setting_gives_no_warning(app: Celery) -> None:
    # When a correctly spelt setting is set (pytest turns any warning into an error here)
    app.conf.task_acks_late = True
    app.conf.update(task_default_queue="other", beat_schedule={})

    # Then it is simply stored
    assert app.conf.task_acks_late is True
    assert app.conf.task_default_queue == "other"


class SettingsObject:
    task_default_queue = "from-class"
    result_expires = 60
    broker_url = "memory://from-class"
    NOT_A_SETTING = "upper-case names are constants, not settings"


def test_config_from_object_reads_a_classs_lowercase_settings(app: Celery) -> None:
    # When settings are loaded from a class
    app.config_from_object(SettingsObject)

    # Then its lower-case attributes became settings, and the broker follows the new URL
    assert app.conf.task_default_queue == "from-class"
    assert app.conf.result_expires == 60
    assert app.broker_url == "memory://from-class"
    assert app.broker.url == "memory://from-class"
    assert "NOT_A_SETTING" not in app.conf


def test_config_from_object_imports_a_module_by_its_path(
    app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a settings module on the import path
    name = f"celeriacconfig_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "import os\n"
        "task_default_queue = 'from-module'\n"
        "worker_prefetch_multiplier = 1\n"
        "task_routes = {'billing.*': {'queue': 'billing'}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        # When the app loads it by name
        app.config_from_object(name)
    finally:
        sys.modules.pop(name, None)

    # Then its settings apply, and the imported module `os` was not taken for one
    assert app.conf.task_default_queue == "from-module"
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.router.queue_for("billing.charge", (), {}) == "billing"
    assert "os" not in app.conf


def test_the_broker_defaults_to_an_sqlite_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app with no broker configured, in an empty working directory
    monkeypatch.chdir(tmp_path)
    bare = Celery("t", set_as_current=False)
    try:
        # Then its broker URL is the embedded SQLite default, opened relative to that directory
        assert bare.conf.broker_url is None
        assert bare.broker_url == "sqlite:///celeriac.db"
        bare.broker.size("celery")
        assert (tmp_path / "celeriac.db").exists()
    finally:
        bare.close()


# tasks ---------------------------------------------------------------------------------


def test_a_task_is_named_after_its_module_and_function(app: Celery) -> None:
    # When a function is registered without a name
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    # Then it is named module.function and registered under that name
    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add


def test_a_task_defined_in_main_is_named_after_the_app(app: Celery) -> None:
    # Given a function that lives in a script run as __main__
    def report() -> str:
        return "done"

    report.__module__ = "__main__"

    # When it is registered
    task = app.task(report)

    # Then the app's main name stands in for __main__, as in Celery
    assert task.name == "t.report"
    assert app.gen_task_name("other", "__main__") == "t.other"
    assert app.gen_task_name("other", "pkg.mod") == "pkg.mod.other"


def test_an_explicit_name_wins(app: Celery) -> None:
    # When a task is given a name
    @app.task(name="billing.charge")
    def charge(amount: int) -> int:
        return amount

    # Then that is its name and its registry key
    assert charge.name == "billing.charge"
    assert "billing.charge" in app.tasks
    assert f"{__name__}.charge" not in app.tasks


def test_an_unknown_task_name_raises_not_registered(app: Celery) -> None:
    # Then asking the registry for a name nobody registered names it in the error
    from celeriac.exceptions import NotRegistered

    with pytest.raises(NotRegistered, match=r"nobody\.registered\.this"):
        app.tasks["nobody.registered.this"]


def test_calling_a_task_runs_it_here_and_sends_nothing(app: Celery) -> None:
    # Given a plain task and a bound one
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(bind=True)
    def whoami(self: Any) -> tuple[bool, Any]:
        return self.request.called_directly, self.request.id

    # When they are called like functions
    total = add(2, 3)
    directly, task_id = whoami()

    # Then they ran in this process, with no request context, and nothing reached the broker
    assert total == 5
    assert directly is True
    assert task_id is None
    assert app.broker.size("celery") == 0


# eager ---------------------------------------------------------------------------------


def test_task_always_eager_runs_delay_in_process_and_returns_an_eager_result(app: Celery) -> None:
    # Given an app in eager mode
    app.conf.task_always_eager = True

    @app.task(bind=True)
    def add(self: Any, x: int, y: int) -> dict[str, Any]:
        return {"sum": x + y, "eager": self.request.is_eager, "id": self.request.id}

    # When the task is sent
    result = add.delay(2, 3)

    # Then it ran here, as an eager request, and the result is already there
    assert isinstance(result, EagerResult)
    assert result.state == states.SUCCESS
    assert result.successful() and result.ready()
    assert result.get() == {"sum": 5, "eager": True, "id": result.id}
    assert app.broker.size("celery") == 0


def test_apply_runs_the_task_in_process_without_eager_mode(app: Celery) -> None:
    # Given a task in an app that is not in eager mode
    @app.task
    def double(x: int) -> int:
        return x * 2

    # When it is applied
    result = double.apply((21,))

    # Then it ran here and its result is an EagerResult with a fresh id
    assert isinstance(result, EagerResult)
    assert result.get() == 42
    assert uuid.UUID(result.id)
    assert app.broker.size("celery") == 0


def test_an_eager_failure_is_kept_in_the_result_unless_eager_propagates(app: Celery) -> None:
    # Given an eager app and a task that fails
    app.conf.task_always_eager = True

    @app.task
    def fail(message: str) -> None:
        raise ValueError(message)

    # When eager failures do not propagate, the failure is held in the result
    result = fail.delay("quietly")
    assert result.state == states.FAILURE
    assert result.failed()
    assert "raise ValueError(message)" in (result.traceback or "")
    assert isinstance(result.get(propagate=False), ValueError)
    with pytest.raises(ValueError, match="quietly"):
        result.get()

    # When task_eager_propagates is set, the call itself raises the task's exception
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="loudly"):
        fail.delay("loudly")
    with pytest.raises(ValueError, match="applied"):
        fail.apply(("applied",))


# sending -------------------------------------------------------------------------------


def test_an_unserialisable_positional_argument_is_named_in_the_type_error(app: Celery) -> None:
    # Given a task taking (x, user)
    @app.task
    def greet(x: int, user: Any) -> str:
        return f"{x} {user}"

    # When an object JSON cannot encode is passed as `user`, positionally or by keyword
    with pytest.raises(TypeError) as positional:
        greet.delay(1, object())
    with pytest.raises(TypeError) as by_keyword:
        greet.delay(1, user=object())
    with pytest.raises(TypeError) as first:
        greet.delay(object(), "ann")

    # Then each error names the argument by index and name, and its type
    assert "argument 1 ('user')" in str(positional.value)
    assert "has type object" in str(positional.value)
    assert "json" in str(positional.value)
    assert "keyword argument 'user'" in str(by_keyword.value)
    assert "argument 0 ('x')" in str(first.value)
    # And nothing was sent
    assert app.broker.size("celery") == 0


def test_a_bound_tasks_arguments_are_named_without_self(app: Celery) -> None:
    # Given a bound task taking (self, x, user)
    @app.task(bind=True)
    def greet(self: Any, x: int, user: Any) -> str:
        return f"{x} {user}"

    # When its second argument cannot be encoded
    with pytest.raises(TypeError, match=r"argument 1 \('user'\) has type set"):
        greet.delay(1, {1, 2})


def test_the_message_on_the_broker_is_celery_protocol_v2(app: Celery) -> None:
    # Given a task
    @app.task
    def add(x: int, y: int, *, scale: int = 1) -> int:
        return (x + y) * scale

    # When it is sent
    result = add.apply_async((2, 3), {"scale": 10})
    delivery = fetch_one(app)
    document = json.loads(delivery.payload)

    # Then the raw document is kombu's envelope around a base64 JSON body
    assert document["content-type"] == "application/json"
    assert document["content-encoding"] == "utf-8"
    properties = document["properties"]
    assert properties["correlation_id"] == result.id
    assert properties["delivery_mode"] == 2
    assert properties["body_encoding"] == "base64"
    assert properties["delivery_info"]["routing_key"] == "celery"
    assert properties["priority"] == 0
    assert properties["reply_to"] == app.oid
    assert properties["delivery_tag"]

    # And the headers are protocol v2's, every one of them
    headers = document["headers"]
    assert headers["lang"] == "py"
    assert headers["task"] == add.name
    assert headers["id"] == result.id
    assert headers["shadow"] is None
    assert headers["eta"] is None
    assert headers["expires"] is None
    assert headers["group"] is None
    assert headers["group_index"] is None
    assert headers["retries"] == 0
    assert headers["timelimit"] == [None, None]
    assert headers["root_id"] == result.id
    assert headers["parent_id"] is None
    assert headers["argsrepr"] == "(2, 3)"
    assert headers["kwargsrepr"] == "{'scale': 10}"
    assert "@" in headers["origin"]
    assert headers["ignore_result"] is False
    assert headers["replaced_task_nesting"] == 0
    assert headers["stamped_headers"] is None
    assert headers["stamps"] == {}

    # And the body is [args, kwargs, embed]
    body = json.loads(base64.b64decode(document["body"]))
    assert body == [
        [2, 3],
        {"scale": 10},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]

    # And celeriac's own decoder reads the same message back
    message = decode(app, delivery)
    assert (message.name, message.id, list(message.args), dict(message.kwargs)) == (
        add.name,
        result.id,
        [2, 3],
        {"scale": 10},
    )


def test_call_options_show_in_the_headers(app: Celery) -> None:
    # Given a task
    @app.task
    def work() -> None:
        return None

    # When it is sent with limits, an expiry, a shadow name and an ignored result
    result = work.apply_async(
        time_limit=30, soft_time_limit=20, expires=60, shadow="work-shadow", ignore_result=True
    )
    headers = json.loads(fetch_one(app).payload)["headers"]

    # Then the headers carry them as Celery lays them out: timelimit is [hard, soft]
    assert headers["timelimit"] == [30, 20]
    assert headers["shadow"] == "work-shadow"
    assert headers["ignore_result"] is True
    expires = datetime.fromisoformat(headers["expires"])
    assert expires.tzinfo is not None
    assert 50 < (expires - datetime.now(UTC)).total_seconds() <= 60
    assert headers["id"] == result.id


def test_non_json_values_travel_with_kombus_type_tags(app: Celery) -> None:
    # Given values JSON has no type for
    @app.task
    def keep(*values: Any) -> None:
        return None

    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    token = uuid.UUID("12345678-1234-5678-1234-567812345678")

    # When they are sent as arguments
    keep.delay(Decimal("1.5"), when, token, b"raw", b"\xff\x00")
    delivery = fetch_one(app)

    # Then the raw JSON body tags each one as kombu does
    raw_body = base64.b64decode(json.loads(delivery.payload)["body"])
    assert b'{"__type__":"decimal","__value__":"1.5"}' in raw_body
    args = json.loads(raw_body)[0]
    assert args[0] == {"__type__": "decimal", "__value__": "1.5"}
    assert args[1] == {"__type__": "datetime", "__value__": "2024-05-06T07:08:09+00:00"}
    assert args[2]["__type__"] == "uuid"
    assert args[2]["__value__"]["hex"] == token.hex
    assert args[3] == {"__type__": "bytes", "__value__": "raw"}
    assert args[4] == {"__type__": "base64", "__value__": base64.b64encode(b"\xff\x00").decode()}

    # And decoding gives back the original values and types
    assert list(decode(app, delivery).args) == [Decimal("1.5"), when, token, b"raw", b"\xff\x00"]


def test_countdown_sets_an_aware_iso_eta_header(app: Celery) -> None:
    # Given a task
    @app.task
    def later() -> None:
        return None

    # When it is sent with a countdown
    before = datetime.now(UTC)
    later.apply_async(countdown=30)
    after = datetime.now(UTC)
    headers = json.loads(_peek(app))["headers"]

    # Then the eta header is an ISO time with a zone, countdown seconds from when it was sent
    eta = datetime.fromisoformat(headers["eta"])
    assert eta.tzinfo is not None and eta.utcoffset() == timedelta(0)
    assert before + timedelta(seconds=30) <= eta <= after + timedelta(seconds=30)
    # And the message waits in the broker, not fetchable before its eta
    assert app.broker.size("celery") == 1
    assert app.broker.fetch(["celery"], 1, 0) == []


def _peek(app: Celery) -> bytes:
    """The raw payload of the one message in 'celery', delayed or not, without leasing it."""
    store = app.broker._store  # type: ignore[attr-defined]
    (message,) = store.messages.values()
    return bytes(message.payload)


def test_an_eta_datetime_is_sent_as_given_and_naive_ones_read_as_utc(app: Celery) -> None:
    # Given a task
    @app.task
    def later() -> None:
        return None

    # When it is sent with a naive eta (enable_utc is on by default)
    later.apply_async(eta=datetime(2030, 1, 2, 3, 4, 5))
    headers = json.loads(_peek(app))["headers"]

    # Then the header is that time in UTC
    assert datetime.fromisoformat(headers["eta"]) == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_queue_priority_and_routes_choose_where_the_message_goes(app: Celery) -> None:
    # Given routes by exact name and by glob
    app.conf.task_routes = {"billing.refund": {"queue": "refunds"}, "billing.*": "billing"}

    @app.task(name="billing.charge")
    def charge() -> None:
        return None

    @app.task(name="billing.refund")
    def refund() -> None:
        return None

    @app.task(name="reports.daily")
    def daily() -> None:
        return None

    # When each is sent, one with an explicit queue and priority
    charge.delay()
    refund.delay()
    daily.delay()
    daily.apply_async(queue="urgent", priority=7)

    # Then each message sits in the queue its route (or the caller) chose
    assert [app.broker.size(q) for q in ("billing", "refunds", "celery", "urgent")] == [1, 1, 1, 1]
    urgent = json.loads(fetch_one(app, "urgent").payload)
    assert urgent["properties"]["priority"] == 7
    assert urgent["properties"]["delivery_info"]["routing_key"] == "urgent"


# the fast path lays out the same bytes ---------------------------------------------------

_SAME_BYTES_CALLS: list[dict[str, Any]] = [
    {},
    {"args": (1, "two", 3.5, None, True)},
    {"args": (Decimal("1.5"), datetime(2024, 5, 6, tzinfo=UTC), uuid.UUID(int=7), b"raw", b"\xff")},
    {"args": ([1, [uuid.UUID(int=1)]],), "kwargs": {"deep": {"when": datetime(2024, 1, 1)}}},
    {"args": ("x" * 5000,), "kwargs": {"many": list(range(100))}},
    {"kwargs": {"b": 2, "a": '100% "quoted" \\ ünïcode'}},
    {"eta": datetime(2030, 1, 2, 3, 4, 5), "expires": datetime(2030, 1, 3, tzinfo=UTC)},
    {"group_id": "g-1", "group_index": 3, "root_id": "r-1", "parent_id": "p-1"},
    {"priority": 7, "queue": "urgent", "time_limit": 30, "soft_time_limit": 20.5, "shadow": "sh%dow"},
    {"time_limit": 30.0, "retries": 2, "ignore_result": True},
    {"serializer": "pickle", "args": (1, (2, 3)), "kwargs": {"k": {"v"}}},
    {"headers": {"custom": 1, "argsrepr": "mine"}},
    {
        "link": {
            "task": "cb",
            "args": [],
            "kwargs": {},
            "options": {},
            "subtask_type": None,
            "immutable": False,
        },
        "link_error": [{"task": "eb", "args": [uuid.UUID(int=9)], "kwargs": {}, "options": {}}],
        "chain": [{"task": "next", "args": [1], "kwargs": {}, "options": {"task_id": "n-1"}}],
        "chord": {"task": "body", "args": [], "kwargs": {}, "options": {"task_id": "b-1"}},
    },
]


@pytest.mark.parametrize("options", _SAME_BYTES_CALLS, ids=lambda options: ",".join(options) or "plain")
def test_composed_messages_are_byte_for_byte_the_general_layout(
    app: Celery, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    # Given delivery tags that are predictable, so two packings of one call can be compared
    from celeriac import sending
    from celeriac.protocol import message as message_module
    from celeriac.protocol import serializers

    tags = iter(range(10**6))
    monkeypatch.setattr(message_module, "_uuid4_text", lambda: f"tag-{next(tags)}")
    app.conf.task_routes = {'%weird "name"': {"queue": "q-ü"}}
    for name in ("proj.task", '%weird "name"'):
        call = sending.Call(name=name, task_id="0f0e-id", **options)
        serializer = serializers.by_name(call.serializer or "json")
        queue = call.queue or app.router.queue_for(call.name, call.args, call.kwargs)
        # When it is packed by the general path, and twice by the composer (the second time from its
        # template, with the settings read once for a batch)
        message, eta = sending.build_message(call, app.conf, app.oid)
        general = sending.outgoing(message, queue=queue, serializer=serializer, eta=eta)
        composer = sending.Composer()
        first, second = (
            composer.compose(call, conf=conf, reply_to=app.oid, serializer=serializer, queue=queue)
            for conf in (app.conf, sending.send_settings(app.conf))
        )
        # Then all three are the same bytes, apart from the delivery tag, in the same place
        for composed in (first, second):
            assert composed.queue == general.queue and composed.priority == general.priority
            assert composed.eta == general.eta
            assert _untagged(composed.payload) == _untagged(general.payload)


def _untagged(payload: bytes) -> bytes:
    start = payload.index(b'"delivery_tag":"tag-') + len(b'"delivery_tag":"tag-')
    return payload[:start] + payload[payload.index(b'"', start) :]


def _collections_during(send: Callable[[], object]) -> int:
    """How many garbage collector passes ran while `send` ran."""
    passes = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(count)
    try:
        send()
    finally:
        gc.callbacks.remove(count)
    return len(passes)


def test_a_large_group_is_sent_with_the_collector_held_off_and_turned_back_on(app: Celery) -> None:
    # Given a task and two groups: one large enough to hold the collector, one below the mark
    from celeriac import group
    from celeriac.canvas import HOLD_COLLECTOR_FROM

    @app.task
    def add(x: int) -> int:
        return x

    large = group(add.s(i) for i in range(4 * HOLD_COLLECTOR_FROM))
    small = group(add.s(i) for i in range(HOLD_COLLECTOR_FROM - 1))
    assert gc.isenabled()

    # When each is sent, twice
    # Then the large group's send runs at most the one pass held back to its end, and the
    # collector is on again after it
    assert _collections_during(large.apply_async) <= 1
    assert gc.isenabled()
    # And the small groups, as many members in all, are sent with the collector at work
    assert _collections_during(lambda: [small.apply_async() for _ in range(4)]) > 1
    assert app.broker.purge("celery") == 4 * HOLD_COLLECTOR_FROM + 4 * (HOLD_COLLECTOR_FROM - 1)


def test_a_large_group_leaves_a_collector_the_program_turned_off_as_it_was(app: Celery) -> None:
    # Given a program that turned the collector off itself, and a large group
    from celeriac import group
    from celeriac.canvas import HOLD_COLLECTOR_FROM

    @app.task
    def add(x: int) -> int:
        return x

    sent = group(add.s(i) for i in range(HOLD_COLLECTOR_FROM))
    gc.disable()
    try:
        # When the group is sent
        sent.apply_async()
        # Then the collector is still off
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_group_members_carry_the_group_id_their_index_and_their_own_ids(app: Celery) -> None:
    # Given a task, and a group of plain members and members with options or extra arguments
    from celeriac import group

    @app.task
    def add(x: int, y: int = 0) -> int:
        return x + y

    plain = group(add.s(i) for i in range(3))
    special = group([add.s(1).set(priority=5), add.si(2, y=3)])

    # When each is sent and its messages are read back
    for sent, args_given, expected in (
        (plain, (), [([0], {}), ([1], {}), ([2], {})]),
        (special, ((10,), {"y": 1}), [([10, 1], {"y": 1}), ([2], {"y": 3})]),
    ):
        result = sent.apply_async(*args_given)
        messages = {message.id: message for message in (decode(app, fetch_one(app)) for _ in expected)}
        for index, (member, (args, kwargs)) in enumerate(zip(result.results, expected, strict=True)):
            # Then each is its own task in the group, at its index, rooted at itself
            message = messages[member.id]
            headers = message.headers
            assert (headers["group"], headers["group_index"]) == (result.id, index)
            assert headers["root_id"] == member.id and headers["parent_id"] is None
            assert (list(message.args), dict(message.kwargs)) == (args, kwargs)


def _received(app: Celery) -> tuple[Delivery, TaskMessage]:
    """The one message waiting on the default queue, fetched and decoded as a worker does."""
    [delivery] = app.broker.fetch(["celery"], 1, timeout=1)
    return delivery, decode_task(unpack(delivery.payload), app.accept_content)


def test_the_workers_request_names_every_field_a_request_has() -> None:
    # Given a message of a task, as a worker receives it
    from celeriac.request import _FIELDS
    from celeriac.worker.execution import build_request
    from celeriac.worker.jobs import Policy, make_job

    app = Celery("fields", broker="memory://")

    @app.task(name="fields.add")
    def add(x: int, y: int) -> int:
        return x + y

    app.send_task("fields.add", (2, 3), expires=60)
    delivery, message = _received(app)

    # When the worker builds the task's request
    job = make_job(1, delivery, message, Policy.of(app, add), "node@host")
    request = build_request(job, add)

    # Then it has exactly the fields of a Request, with the message's values
    assert set(request.as_dict()) == set(_FIELDS)
    assert (request.id, request.task, request.args, request.hostname) == (
        message.id,
        "fields.add",
        (2, 3),
        "node@host",
    )
    assert request.expires is not None and request.called_directly is False


def test_a_workers_request_reads_its_seldom_used_fields_when_first_asked() -> None:
    # Given the request a worker builds for a message with headers a task rarely reads
    from celeriac.worker.execution import build_request
    from celeriac.worker.jobs import Policy, make_job

    app = Celery("lazy", broker="memory://")

    @app.task(name="lazy.echo")
    def echo(x: int) -> int:
        return x

    sent = app.send_task("lazy.echo", (1,), retries=2)
    delivery, message = _received(app)
    request = build_request(make_job(1, delivery, message, Policy.of(app, echo), "n@h"), echo)

    # When a task reads them, by attribute or by name, they hold the message's values
    assert request.retries == 2
    assert request.get("root_id") == sent.id
    assert request.delivery_info == {
        "exchange": "",
        "routing_key": "celery",
        "priority": 0,
        "redelivered": False,
    }
    assert request.correlation_id == sent.id

    # And a name that is no field is still an AttributeError
    with pytest.raises(AttributeError, match="no_such_field"):
        _ = request.no_such_field

    # And a request not yet read in full pickles with every field
    unread = build_request(make_job(2, delivery, message, Policy.of(app, echo), "n@h"), echo)
    assert pickle.loads(pickle.dumps(unread)).as_dict() == request.as_dict()


def test_a_busy_consumer_tops_up_its_prefetch_in_large_batches() -> None:
    # Given a solo consumer with a prefetch limit of 8 and 20 messages waiting
    from celeriac.worker.consumer import Consumer, Settings
    from celeriac.worker.pools.solo import SoloPool

    app = Celery("batches", broker="memory://")

    @app.task(name="batches.noop")
    def noop(n: int) -> int:
        return n

    for n in range(20):
        noop.delay(n)
    broker = app.broker
    consumer = Consumer(app, broker, SoloPool(app, 1), Settings("n@h", ("celery",), 8, 10))

    # When it runs them all, noting how many stay in the queue after each step
    left = []
    while consumer.processed < 20:
        consumer.step()
        left.append(broker.size("celery"))

    # Then it took a full batch first, and more only once a quarter of its prefetch remained
    assert sorted(set(left), reverse=True) == [12, 6, 0]


def test_an_inline_consumer_runs_its_prefetch_in_one_step_and_stops_between_tasks() -> None:
    # Given a solo consumer with a prefetch limit of 8, 20 messages waiting, and a task
    # that asks for a stop when it gets 10
    from celeriac.worker.consumer import Consumer, Settings
    from celeriac.worker.pools.solo import SoloPool

    app = Celery("inline", broker="memory://")
    stop = threading.Event()
    ran: list[int] = []

    @app.task(name="inline.note")
    def note(n: int) -> None:
        ran.append(n)
        if n == 10:
            stop.set()

    for n in range(20):
        note.delay(n)
    consumer = Consumer(app, app.broker, SoloPool(app, 1), Settings("n@h", ("celery",), 8, 10))

    # When it steps twice with the stop event, then once more
    consumer.step(stop=stop)
    after_first = list(ran)
    consumer.step(stop=stop)
    consumer.step(stop=stop)

    # Then the first step ran its batch down to a quarter of the prefetch, the second ran
    # the next batch until the stop, and once stopped no step started another task
    assert after_first == list(range(6))
    assert ran == list(range(11))
    assert [job.message.args for job in consumer.reserved] == [[n] for n in range(11, 14)]


def test_a_task_class_that_overrides_before_start_and_call_has_both_run() -> None:
    # Given a base task class that overrides before_start and __call__, and a task on it
    from celeriac import Task

    seen: list[str] = []

    class Watched(Task):  # type: ignore[type-arg]
        def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
            seen.append(f"before_start {list(args)}")

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            seen.append("__call__")
            return super().__call__(*args, **kwargs)

    app = Celery("hooks", broker="memory://")

    @app.task(base=Watched, name="hooks.double")
    def double(x: int) -> int:
        return 2 * x

    @app.task(name="hooks.plain")
    def plain(x: int) -> int:
        return x

    # When each runs through the tracer
    results = (double.apply((4,)).get(), plain.apply((5,)).get())

    # Then the overridden hooks ran for the task that has them, and both returned their values
    assert results == (8, 5)
    assert seen == ["before_start [4]", "__call__"]
