"""The package's layering rules (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import celeriac

PACKAGE = Path(celeriac.__file__).resolve().parent

# module prefix -> celeriac modules it must never import
FORBIDDEN = {
    "celeriac.protocol": (
        "celeriac.app",
        "celeriac.task",
        "celeriac.worker",
        "celeriac.brokers",
        "celeriac.backends",
    ),
    "celeriac.brokers": (
        "celeriac.app",
        "celeriac.task",
        "celeriac.worker",
        "celeriac.backends",
        "celeriac.result",
    ),
    "celeriac.backends": (
        "celeriac.app",
        "celeriac.task",
        "celeriac.worker",
        "celeriac.brokers",
        "celeriac.result",
    ),
    "celeriac.app": ("celeriac.worker", "celeriac.cli"),
    "celeriac.task": ("celeriac.worker", "celeriac.cli"),
    "celeriac.result": ("celeriac.worker", "celeriac.cli"),
    "celeriac.worker": ("celeriac.cli",),
    # L1 helpers that brokers and backends share: below both, so they import neither
    "celeriac.redis_spare": ("celeriac.app", "celeriac.worker", "celeriac.brokers", "celeriac.backends"),
    "celeriac.redis_deferred": ("celeriac.app", "celeriac.worker", "celeriac.brokers", "celeriac.backends"),
    # L0: nothing of celeriac
    "celeriac.forks": ("celeriac.",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_each_module_imports_only_from_layers_below_it(path: Path) -> None:
    # Given a module and the rule for its layer
    name = _module_name(path)
    rules = [
        banned for prefix, banned in FORBIDDEN.items() if name == prefix or name.startswith(prefix + ".")
    ]
    # Then none of its imports reaches a layer above it
    for banned in rules:
        for imported in _imports(path):
            assert not imported.startswith(banned), f"{name} imports {imported}"


def test_the_public_names_are_pinned() -> None:
    # The public surface changes only on purpose
    assert sorted(celeriac.__all__) == sorted(
        [
            "AsyncResult",
            "Celery",
            "EagerResult",
            "GroupResult",
            "Signature",
            "Task",
            "__version__",
            "chain",
            "chord",
            "group",
            "shared_task",
            "signature",
            "states",
        ]
    )
    for name in celeriac.__all__:
        assert hasattr(celeriac, name)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_imports_celery_or_kombu(path: Path) -> None:
    # celeriac speaks Celery's formats; it never runs Celery's code
    for imported in _imports(path):
        assert imported.split(".")[0] not in {"celery", "kombu", "billiard"}, f"{path} imports {imported}"
