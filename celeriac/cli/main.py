"""`celeriac -A tasks worker|purge ...`: Celery's commands and flags."""

from __future__ import annotations

from typing import Any

import click

from celeriac.app import Celery
from celeriac.cli.loading import AppNotFound, find_app
from celeriac.worker.pools import POOL_NAMES


class Context:
    """What the top-level options chose, handed to each command."""

    def __init__(self, app_spec: str | None, broker: str | None, backend: str | None) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self.backend = backend

    def app(self) -> Celery:
        """Load the app named by `-A` (or a bare one) and apply `--broker`/`--result-backend`."""
        try:
            app = find_app(self.app_spec) if self.app_spec else Celery("default")
        except AppNotFound as exc:
            raise click.UsageError(str(exc)) from exc
        if self.broker:
            app.conf.broker_url = self.broker
        if self.backend:
            app.conf.result_backend = self.backend
        return app


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", help="The app: module, module:attribute, or package.")
@click.option("-b", "--broker", help="Broker URL (overrides the app's).")
@click.option("--result-backend", help="Result backend URL (overrides the app's).")
@click.version_option(package_name="celeriac")
@click.pass_context
def cli(ctx: click.Context, app_spec: str | None, broker: str | None, result_backend: str | None) -> None:
    """celeriac: a distributed task queue with Celery's API."""
    ctx.obj = Context(app_spec, broker, result_backend)


@cli.command()
@click.option("-l", "--loglevel", default="WARNING", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("-c", "--concurrency", type=int, default=None, help="Pool size (default: CPUs).")
@click.option("-P", "--pool", type=click.Choice(POOL_NAMES), default="prefork", show_default=True)
@click.option("-Q", "--queues", default=None, help="Comma-separated queues to consume.")
@click.option("-n", "--hostname", default=None, help="Node name; %h, %n and %d expand.")
@click.option("--prefetch-multiplier", type=int, default=None, help="Messages leased per pool slot.")
@click.option("-E", "--task-events", is_flag=True, help="Send task events (not available yet; ignored).")
@click.option("--without-gossip", is_flag=True, hidden=True)
@click.option("--without-mingle", is_flag=True, hidden=True)
@click.option("--without-heartbeat", is_flag=True, hidden=True)
@click.pass_obj
def worker(
    obj: Context,
    /,
    loglevel: str,
    concurrency: int | None,
    pool: str,
    queues: str | None,
    hostname: str | None,
    prefetch_multiplier: int | None,
    **_ignored: Any,
) -> None:
    """Start a worker."""
    from celeriac.worker.logs import setup_logging
    from celeriac.worker.worker import Worker

    try:
        setup_logging(loglevel)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'-l' / '--loglevel'") from exc
    app = obj.app()
    Worker(
        app,
        hostname=hostname,
        pool=pool,
        concurrency=concurrency,
        queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
        prefetch_multiplier=prefetch_multiplier,
    ).run()


@cli.command()
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("-Q", "--queues", default=None, help="Comma-separated queues to purge.")
@click.pass_obj
def purge(obj: Context, force: bool, queues: str | None) -> None:
    """Delete every waiting message in the app's queues."""
    app = obj.app()
    names = [q.strip() for q in queues.split(",")] if queues else [app.conf.task_default_queue]
    if not force:
        click.confirm(f"Delete all messages waiting in {', '.join(names)}?", abort=True)
    total = sum(app.broker.purge(name) for name in names)
    click.echo(
        f"Purged {total} message{'s' if total != 1 else ''} from {len(names)} known task queue"
        f"{'s' if len(names) != 1 else ''}."
    )


def main() -> None:
    """Entry point of the `celeriac` console script."""
    cli(prog_name="celeriac")


if __name__ == "__main__":
    main()
