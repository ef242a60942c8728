"""fgid's own log records in the Prefect run that emitted them, in whichever process runs it."""

from __future__ import annotations

import logging
import sys
import threading

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

LOGGER = "fgid"
_attach = threading.Lock()  # shard tasks start on several threads at once


class RunLogHandler(APILogHandler):
    """Prefect's API handler, quiet about records outside any run (a plain build, a helper
    thread): those still reach the console through the usual handlers."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], MissingContextError):
            return
        super().handleError(record)


def send_fgid_logs() -> None:
    """Attach the handler to the `fgid` logger once per process.

    Called from the flow and from every shard task: a Dask worker is a process of its own (on a
    remote host, started by someone else's `dask worker`), where no flow configured logging, so
    environment settings such as PREFECT_LOGGING_EXTRA_LOGGERS cannot be relied on there. The
    logger's level is left alone: warnings and errors reach the run (what Prefect sends for any
    library), and fgid's info lines repeat what the tasks log themselves."""
    logger = logging.getLogger(LOGGER)
    with _attach:
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())
