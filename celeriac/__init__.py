"""celeriac: a distributed task queue with Celery's API and wire format.

from celeriac import Celery

app = Celery("tasks", broker="sqlite:///tasks.db", backend="sqlite:///tasks.db")

@app.task
def add(x, y):
    return x + y
"""

from celeriac import states
from celeriac.app import Celery, shared_task
from celeriac.canvas import Signature, chain, chord, group, signature
from celeriac.result import AsyncResult, EagerResult, GroupResult
from celeriac.task import Task

__version__ = "0.1.0"

__all__ = [
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
