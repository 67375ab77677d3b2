"""Workflows through real workers: chains, groups, chords, callbacks and errbacks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from celeriac import chain, chord, group, states
from celeriac.exceptions import ChordError
from tests.conftest import Project

ProjectFactory = Callable[..., Project]
TIMEOUT = 30

TASKS = """
@app.task
def add(x, y):
    return x + y


@app.task
def multiply(x, y):
    return x * y


@app.task
def total(values):
    return sum(values)


@app.task
def explode(x):
    raise ValueError(f"boom {x}")


@app.task
def note(value, tag):
    record("notes", f"{tag}:{value}")
    return value
"""


@pytest.fixture
def project(make_project: ProjectFactory) -> Project:
    project = make_project(TASKS)
    project.worker(pool="threads", concurrency=4)
    return project


def test_a_chain_passes_each_result_to_the_next_step(project: Project) -> None:
    # Given add(2, 2) | multiply(10) | add(1)
    tasks = project.module
    flow = chain(tasks.add.s(2, 2), tasks.multiply.s(10), tasks.add.s(1))
    # When it runs
    result = flow()
    # Then the last step's result is ((2 + 2) * 10) + 1, and each step knows its parent
    assert result.get(timeout=TIMEOUT) == 41
    assert (tasks.add.s(2, 2) | tasks.multiply.s(3)).apply_async().get(timeout=TIMEOUT) == 12


def test_an_immutable_step_ignores_the_previous_result(project: Project) -> None:
    # Given a chain whose second step is immutable
    tasks = project.module
    flow = chain(tasks.add.s(1, 1), tasks.add.si(10, 10))
    # Then its result is its own arguments' sum
    assert flow.apply_async().get(timeout=TIMEOUT) == 20


def test_a_failing_step_fails_the_rest_of_the_chain(project: Project) -> None:
    # Given a chain whose middle step raises
    tasks = project.module
    result = chain(tasks.add.s(1, 1), tasks.explode.s(), tasks.add.s(5))()
    # Then the last step's result re-raises the middle step's error, and the last step never ran
    with pytest.raises(ValueError, match="boom 2"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE


def test_a_group_returns_its_members_results_in_order(project: Project) -> None:
    # Given a group of three additions
    tasks = project.module
    # When it runs
    result = group(tasks.add.s(1, 2), tasks.add.s(3, 4), tasks.add.s(5, 6))()
    # Then the results come back in the members' order
    assert result.get(timeout=TIMEOUT) == [3, 7, 11]
    assert result.ready() and result.successful() and result.completed_count() == 3
    assert group(tasks.add.s(i, i) for i in range(20)).apply_async().get(timeout=TIMEOUT) == [
        2 * i for i in range(20)
    ]


def test_a_chord_sends_the_header_results_to_the_body(project: Project) -> None:
    # Given a chord of ten additions with a summing body
    tasks = project.module
    # When it runs
    result = chord(tasks.add.s(i, i) for i in range(10))(tasks.total.s())
    # Then the body gets the header results in order, once
    assert result.get(timeout=TIMEOUT) == sum(2 * i for i in range(10))


def test_a_chord_whose_header_fails_fails_its_body(project: Project) -> None:
    # Given a chord with one failing header task
    tasks = project.module
    result = chord([tasks.add.s(1, 1), tasks.explode.s(7)], tasks.total.s()).apply_async()
    # Then the body fails with ChordError naming the cause
    with pytest.raises(ChordError, match="boom 7"):
        result.get(timeout=TIMEOUT)


def test_an_empty_chord_calls_its_body_with_no_results(project: Project) -> None:
    tasks = project.module
    assert chord([], tasks.total.s()).apply_async().get(timeout=TIMEOUT) == 0


def test_link_callbacks_get_the_result_and_errbacks_the_failed_task_id(project: Project) -> None:
    # Given a task linked to a callback and a failing task linked to an errback
    tasks = project.module
    ok = tasks.add.apply_async((2, 3), link=tasks.note.s("ok"))
    bad = tasks.explode.apply_async((1,), link_error=tasks.note.s("failed"))
    # When both finish
    assert ok.get(timeout=TIMEOUT) == 5
    with pytest.raises(ValueError):
        bad.get(timeout=TIMEOUT)
    # Then the callback got the result first, and the errback the failed task's id
    from tests.conftest import wait_until

    notes = wait_until(
        lambda: len(project.lines("notes")) == 2 and project.lines("notes"), TIMEOUT, "the notes"
    )
    assert sorted(notes) == sorted(["ok:5", f"failed:{bad.id}"])
