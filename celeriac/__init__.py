"""celeriac: a distributed task queue with Celery's API and wire format.

from celeriac import Celery

app = Celery("tasks", broker="sqlite:///tasks.db", backend="sqlite:///tasks.db")

@app.task
def add(x, y):
    return x + y
"""

from celeriac import states
from celeriac.app import Celery, shared_task
from celeriac.result import AsyncResult, EagerResult
from celeriac.task import Task

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Celery",
    "EagerResult",
    "Task",
    "__version__",
    "shared_task",
    "states",
]
