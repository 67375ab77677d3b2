"""Workflows as data: `Signature` (`add.s(2, 2)`), `chain`, `group`.

A signature is a task call not yet made. On the wire it is Celery's signature dict
``{"task", "args", "kwargs", "options", "subtask_type", "immutable"}``. A chain is sent as
its first task, carrying the remaining steps (reversed) in the message's `chain`; the
worker that finishes a step sends the next with the result prepended to its arguments.
A group sends each member with the group's id and the member's index, in one batch.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.protocol.message import new_id
from celeriac.result import AsyncResult, GroupResult
from celeriac.sending import Call

if TYPE_CHECKING:
    from celeriac.app import Celery

# Options a signature may carry that become part of the call; others ride along unused.
_CALL_OPTIONS = frozenset(Call.__dataclass_fields__) - {"name", "args", "kwargs"}


class Signature:
    """A task call described but not made: `add.s(2, 2)`, `add.si(2, 2)` (immutable)."""

    def __init__(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        subtask_type: str | None = None,
        app: Celery | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable
        self.subtask_type = subtask_type
        self._app = app

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Celery | None = None) -> Signature:
        """Read a signature from its wire form (as Celery sends it)."""
        if isinstance(data, Signature):
            return data
        return cls(
            str(data["task"]),
            data.get("args") or (),
            data.get("kwargs") or {},
            data.get("options") or {},
            immutable=bool(data.get("immutable")),
            subtask_type=data.get("subtask_type"),
            app=app,
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: Celery's signature dict."""
        return {
            "task": self.task,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "options": dict(self.options),
            "subtask_type": self.subtask_type,
            "immutable": self.immutable,
        }

    # dict(signature) gives the wire form, as message embedding expects
    def keys(self) -> Iterable[str]:
        return self.to_dict().keys()

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    @property
    def app(self) -> Celery:
        if self._app is None:
            from celeriac._state import get_current_app

            return get_current_app()
        return self._app

    @property
    def id(self) -> str | None:
        """The task id, once frozen."""
        value = self.options.get("task_id")
        return str(value) if value else None

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and other.to_dict() == self.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # building --------------------------------------------------------------------------

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A copy with `args` prepended (unless immutable) and `kwargs`/`options` merged in."""
        if self.immutable:
            merged_args, merged_kwargs = self.args, dict(self.kwargs)
        else:
            merged_args, merged_kwargs = tuple(args) + self.args, {**self.kwargs, **(kwargs or {})}
        return Signature(
            self.task,
            merged_args,
            merged_kwargs,
            {**self.options, **options},
            immutable=self.immutable,
            subtask_type=self.subtask_type,
            app=self._app,
        )

    def set(self, **options: Any) -> Signature:
        """Set call options (queue, countdown, ...) in place; returns self."""
        self.options.update(options)
        return self

    def freeze(self, task_id: str | None = None) -> str:
        """Give the signature its task id now (kept if it has one); return it."""
        self.options.setdefault("task_id", task_id or new_id())
        return str(self.options["task_id"])

    def link(self, callback: Signature) -> Signature:
        """Run `callback` with this task's result when it succeeds."""
        self.options.setdefault("link", []).append(callback.to_dict())
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Run `errback` with this task's id when it fails."""
        self.options.setdefault("link_error", []).append(errback.to_dict())
        return errback

    on_error = link_error

    def __or__(self, other: Signature | chain) -> chain:
        return chain(self, other)

    # calling ---------------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send the call, with these arguments added."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the call, with `args` prepended and `kwargs`/`options` merged in."""
        call = self.call_with(args, kwargs, options)
        app = self.app
        app.publish([app.prepare(call, app.tasks.get(call.name))])
        return AsyncResult(str(call.task_id), app=app)

    def as_call(self) -> Call:
        """The call this signature makes (frozen with a task id if it had none)."""
        self.freeze()
        return _call(self.task, self.args, self.kwargs, self.options)

    def call_with(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Call:
        """The call `clone(args, kwargs, **options).as_call()` makes, without the clone.

        This signature is left as it is (not frozen); the call gets a fresh task id unless
        the options give one.
        """
        if self.immutable or not (args or kwargs):
            merged_args, merged_kwargs = self.args, self.kwargs
        else:
            merged_args = tuple(args) + self.args
            merged_kwargs = {**self.kwargs, **kwargs} if kwargs else self.kwargs
        merged = {**self.options, **options} if options else self.options
        return _call(self.task, merged_args, merged_kwargs, merged)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here and now, as a function call."""
        merged = self.clone(args, kwargs)
        return self.app.tasks[self.task](*merged.args, **merged.kwargs)


def _call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Mapping[str, Any]) -> Call:
    """The call of task `name` with these options (a fresh task id unless they hold one)."""
    if not options:
        return Call(name=name, args=args, kwargs=kwargs, task_id=new_id())
    chosen = {key: value for key, value in options.items() if key in _CALL_OPTIONS}
    if "task_id" not in chosen:
        chosen["task_id"] = new_id()
    if "routing_key" in options and "queue" not in chosen:
        chosen["queue"] = options["routing_key"]
    return Call(name=name, args=args, kwargs=kwargs, **chosen)


HOLD_COLLECTOR_FROM = 1000  # group members; below this the collector's passes cost little


@contextlib.contextmanager
def collector_held(members: int) -> Iterator[None]:
    """Hold Python's cyclic garbage collector off while a large group is sent.

    Sending builds a few objects per member, and they all live until the send ends, so the
    collector would run many young passes and a full one or two over objects it cannot free:
    about a sixth of a 20,000-member send. Reference counting frees everything as usual
    meanwhile; only cycles wait until the send ends, and the collector runs as before after it.
    Nothing is held when the collector is already off.
    """
    if members < HOLD_COLLECTOR_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _publish_all(app: Celery, calls: Sequence[Call]) -> None:
    tasks = app.tasks
    app.publish(app.prepare_many([(call, tasks.get(call.name)) for call in calls]))


def signature(task: str | Signature | Mapping[str, Any], *args: Any, **kwargs: Any) -> Signature:
    """Make a signature from a task name, a signature dict, or another signature."""
    if isinstance(task, Signature):
        return task.clone()
    if isinstance(task, Mapping):
        return Signature.from_dict(task)
    return Signature(task, *args, **kwargs)


class chain:
    """Tasks run one after another, each given the previous one's result first."""

    def __init__(self, *tasks: Signature | chain | Iterable[Signature]) -> None:
        steps: list[Signature] = []
        for item in tasks:
            if isinstance(item, chain):
                steps.extend(item.tasks)
            elif isinstance(item, Signature):
                steps.append(item)
            else:
                steps.extend(item)
        self.tasks: list[Signature] = steps

    def __or__(self, other: Signature | chain) -> chain:
        return chain(self, other)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.tasks))

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the first step, carrying the rest; return the last step's result handle."""
        if not self.tasks:
            raise ValueError("an empty chain has nothing to run")
        steps = [step.clone() for step in self.tasks]
        root = steps[0].freeze(options.pop("task_id", None))
        for step in steps[1:]:
            step.freeze()
            step.options.setdefault("root_id", root)
        first, rest = steps[0], steps[1:]
        remaining = [step.to_dict() for step in reversed(rest)]
        first.apply_async(args, kwargs, chain=remaining or None, **options)
        return AsyncResult(str(steps[-1].options["task_id"]), app=first.app)


class group:
    """Tasks run in parallel; the result is the list of their results, in order."""

    def __init__(self, *tasks: Signature | Iterable[Signature]) -> None:
        members: list[Signature] = []
        for item in tasks:
            if isinstance(item, Signature):
                members.append(item)
            else:
                members.extend(item)
        self.tasks = members

    def __repr__(self) -> str:
        return f"group({list(self.tasks)!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """Send every member in one batch; return a `GroupResult` over them."""
        group_id = options.pop("group_id", None) or new_id()
        if not self.tasks:
            return GroupResult(group_id, [])
        app = self.tasks[0].app
        plain = not (args or kwargs or options)
        with collector_held(len(self.tasks)):
            calls = [
                # What call_with gives for a member with no options of its own, made directly.
                Call(member.task, member.args, member.kwargs, new_id(), group_id=group_id, group_index=index)
                if plain and not member.options
                else member.call_with(args, kwargs, {**options, "group_id": group_id, "group_index": index})
                for index, member in enumerate(self.tasks)
            ]
            _publish_all(app, calls)
            results: list[AsyncResult[Any]] = [AsyncResult(str(call.task_id), app=app) for call in calls]
        return GroupResult(group_id, results, app=app)


def send_followups(app: Celery, request: Any, retval: Any) -> None:
    """After a task succeeded: send its link callbacks and the next step of its chain.

    Called inside the task's context, so each follow-up gets this task as its parent.
    """
    follow = [Signature.from_dict(callback, app).call_with((retval,)) for callback in request.callbacks or ()]
    if request.chain:
        steps = list(request.chain)
        upcoming = Signature.from_dict(steps.pop(), app)
        follow.append(upcoming.call_with((retval,), None, {"chain": steps or None}))
    if follow:
        _publish_all(app, follow)


def send_errbacks(app: Celery, request: Any, exc: BaseException) -> None:
    """After a task failed: mark the chain's later steps failed too, and send its errbacks."""
    backend = app.backend
    if backend is not None:
        for step in request.chain or ():
            step_id = (step.get("options") or {}).get("task_id")
            if step_id:
                backend.store_result(step_id, exc, "FAILURE")
    errbacks = [
        Signature.from_dict(errback, app).call_with((request.id,)) for errback in request.errbacks or ()
    ]
    if errbacks:
        _publish_all(app, errbacks)


class chord:
    """A group (the header) whose results, in order, are passed to one more task (the body)."""

    def __init__(self, header: group | Iterable[Signature], body: Signature | None = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = body

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Signature | None = None, **options: Any) -> AsyncResult[Any]:
        if body is not None:
            return chord(self.header, body).apply_async(**options)
        return self.apply_async(**options)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the header tasks; the worker finishing the last one sends the body.

        Returns:
            The body's result handle.
        """
        if self.body is None:
            raise ValueError("a chord needs a body: chord(header, body) or chord(header)(body)")
        group_id = options.pop("group_id", None) or new_id()
        body = self.body.clone(group_id=group_id)
        body.freeze(options.pop("task_id", None))
        app = body.app
        members = self.header.tasks
        if not members:
            body.apply_async(([],))
        else:
            app.require_backend().set_chord_size(group_id, len(members))
            embedded = body.to_dict()
            calls = [
                member.call_with(
                    args, kwargs, {**options, "group_id": group_id, "group_index": index, "chord": embedded}
                )
                for index, member in enumerate(members)
            ]
            _publish_all(app, calls)
        return AsyncResult(str(body.id), app=app)


def complete_chord_part(app: Celery, request: Any, state: str, value: Any) -> None:
    """Count a finished chord header task; the one that completes the header sends the body."""
    backend = app.backend
    if backend is None or not request.chord or not request.group:
        return
    parts = backend.chord_part_done(request.group, request.group_index or 0, request.id, state, value)
    if parts is None:
        return
    body = Signature.from_dict(request.chord, app)
    failed = next((part for part in parts if part["status"] != "SUCCESS"), None)
    if failed is None:
        body.clone(([part["result"] for part in parts],)).apply_async()
        return
    from celeriac.exceptions import ChordError
    from celeriac.protocol.failures import decode_exception

    cause = decode_exception(failed["result"])
    error = ChordError(f"Dependency {failed['task_id']} raised {cause!r}")
    if body.id:
        backend.store_result(body.id, error, "FAILURE")
    errbacks = [
        Signature.from_dict(e, app).call_with((body.id,)) for e in body.options.get("link_error") or ()
    ]
    if errbacks:
        _publish_all(app, errbacks)
