"""Settings: Celery's setting names and defaults, read through `app.conf`."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from datetime import timedelta
from typing import Any

# Settings celeriac acts on, with Celery's defaults (broker_url is ours: the embedded SQLite file).
DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "broker_transport_options": {},
    "broker_connection_timeout": 4.0,
    "broker_connection_retry": True,
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": 100,
    "result_backend": None,
    "result_serializer": "json",
    "result_accept_content": None,
    "result_expires": timedelta(days=1),
    "result_extended": False,
    "task_serializer": "json",
    "accept_content": ["json"],
    "timezone": None,
    "enable_utc": True,
    "task_default_queue": "celery",
    "task_default_priority": None,
    "task_routes": None,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": None,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_track_started": False,
    "task_default_rate_limit": None,
    "task_annotations": None,
    "task_create_missing_queues": True,
    "task_publish_retry": True,
    "task_publish_retry_policy": {},
    "task_send_sent_event": False,
    "task_default_delivery_mode": "persistent",
    "task_protocol": 2,
    "worker_prefetch_multiplier": 4,
    "worker_concurrency": None,
    "worker_max_tasks_per_child": None,
    "worker_max_deliveries": 10,
    "worker_send_task_events": False,
    "worker_hijack_root_logger": True,
    "worker_redirect_stdouts": True,
    "include": [],
    "imports": [],
}

# Celery settings celeriac accepts without acting on them yet, so no warning is given.
RECOGNISED = frozenset(
    {
        "beat_schedule",
        "beat_scheduler",
        "beat_schedule_filename",
        "beat_max_loop_interval",
        "broker_heartbeat",
        "broker_pool_limit",
        "broker_login_method",
        "broker_use_ssl",
        "broker_read_url",
        "broker_write_url",
        "broker_channel_error_retry",
        "result_backend_transport_options",
        "result_persistent",
        "result_compression",
        "result_chord_join_timeout",
        "result_chord_ordered",
        "redis_backend_health_check_interval",
        "redis_max_connections",
        "redis_socket_timeout",
        "redis_socket_connect_timeout",
        "redis_retry_on_timeout",
        "task_compression",
        "task_queues",
        "task_default_exchange",
        "task_default_exchange_type",
        "task_default_routing_key",
        "task_queue_max_priority",
        "task_inherit_parent_priority",
        "task_remote_tracebacks",
        "task_allow_error_cb_on_chord_header",
        "worker_lost_wait",
        "worker_pool",
        "worker_pool_restarts",
        "worker_disable_rate_limits",
        "worker_state_db",
        "worker_timer_precision",
        "worker_log_format",
        "worker_task_log_format",
        "worker_log_color",
        "worker_proc_alive_timeout",
        "worker_cancel_long_running_tasks_on_connection_loss",
        "worker_enable_remote_control",
        "worker_max_memory_per_child",
        "worker_autoscaler",
        "worker_consumer",
        "worker_direct",
        "worker_deduplicate_successful_tasks",
        "event_queue_expires",
        "event_queue_ttl",
        "event_serializer",
        "event_exchange",
        "control_queue_expires",
        "security_key",
        "security_certificate",
        "security_cert_store",
        "database_engine_options",
        "database_table_names",
        "cache_backend",
    }
)
KNOWN = frozenset(DEFAULTS) | RECOGNISED


def _warn_unknown(name: str) -> None:
    if name in KNOWN or name.startswith("_") or name.isupper():
        return
    close = difflib.get_close_matches(name, sorted(KNOWN), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    warnings.warn(f"unknown setting {name!r}{hint}", UserWarning, stacklevel=4)


class Settings(MutableMapping[str, Any]):
    """The app's configuration: Celery setting names, item and attribute access alike.

    Names celeriac does not know are kept, with a warning naming the closest known one.
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(DEFAULTS))
        if values:
            self.update(values)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        _warn_unknown(name)
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting named {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def from_object(self, obj: object | str) -> None:
        """Copy the lowercase settings of a module, class or object (or an import path to one)."""
        source = importlib.import_module(obj) if isinstance(obj, str) else obj
        for name in dir(source):
            if name.startswith("_") or not name.islower():
                continue
            value = getattr(source, name)
            if name not in KNOWN and (
                inspect.ismodule(value) or inspect.isroutine(value) or inspect.isclass(value)
            ):
                continue
            self[name] = value

    def from_envvar(self, variable: str) -> None:
        """Load settings from the module named in the environment variable `variable`."""
        module = os.environ.get(variable)
        if not module:
            raise KeyError(f"environment variable {variable!r} is not set")
        self.from_object(module)

    @property
    def result_expires_seconds(self) -> float | None:
        """`result_expires` as seconds (it may be set as a timedelta or a number)."""
        value = self._values.get("result_expires")
        if isinstance(value, timedelta):
            return value.total_seconds()
        return float(value) if value else None
