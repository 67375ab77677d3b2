"""The startup banner: the same facts, in the same places, as Celery's."""

from __future__ import annotations

import platform
import re
from collections.abc import Sequence
from datetime import datetime

import celeriac

_ART = [
    " ----------------- ",
    " ---- \\ | / ----- ",
    " ---- (   ) ----- ",
    " --- (     ) ---- ",
    " ---- (   ) ----- ",
    " ----- \\_/ ------ ",
    " ----- /|\\ ------ ",
    " ---- / | \\ ----- ",
    " ----------------- ",
    " ----------------- ",
]


def mask_url(url: str | None) -> str:
    """Hide the password in a URL."""
    if not url:
        return "disabled://"
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1**@", url)


def render(
    *,
    hostname: str,
    app_label: str,
    transport: str,
    results: str | None,
    concurrency: int,
    pool: str,
    queues: Sequence[str],
    tasks: Sequence[str],
) -> str:
    """Lay out the banner printed before "ready."."""
    right = [
        f"{hostname} v{celeriac.__version__}",
        f"{platform.platform()} {datetime.now():%Y-%m-%d %H:%M:%S}",
        "[config]",
        f".> app:         {app_label}",
        f".> transport:   {mask_url(transport)}",
        f".> results:     {mask_url(results)}",
        f".> concurrency: {concurrency} ({pool})",
        ".> task events: OFF (enable -E to monitor)",
        "[queues]",
    ]
    lines = [art + text for art, text in zip(_ART, right, strict=False)]
    pad = " " * len(_ART[0])
    lines += [f"{pad}.> {queue:<16} exchange={queue}(direct) key={queue}" for queue in queues]
    lines += ["", "[tasks]"]
    lines += [f"  . {name}" for name in sorted(tasks) if not name.startswith("celery.")]
    return "\n".join(lines) + "\n"
