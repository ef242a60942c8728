"""Which shard failures are worth a retry: only those that can clear up by themselves."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

from fgid.errors import FailureError, UsageError

# Network and storage-service conditions that pass. A full disk (ENOSPC, EDQUOT), a refused
# permission (EACCES, EPERM), a read-only or wrong path (EROFS, EISDIR, ENOENT) stay as they are
# until someone acts, so retrying them only delays the failure by the retry delays.
TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
    errno.ESTALE,  # NFS handle gone after a server restart
    # An I/O error on a network or FUSE-mounted bucket usually passes; on a failing local disk it
    # does not, and then costs the retry delays once.
    errno.EIO,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError, 500
}
# Object-store error codes that mean "slow down" or "try again".
THROTTLING_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "SlowDown",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "ProvisionedThroughputExceededException",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
# A Dask worker lost mid-task or a dropped connection to it (matched by name: flows may run
# without distributed installed).
TRANSIENT_NAMES = {"KilledWorker", "CommClosedError", "WorkerLost"}

log = logging.getLogger(__name__)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _service_verdict(exc: BaseException) -> bool | None:
    """For an object store's answer (botocore's ClientError): throttled or failing, or None."""
    response = getattr(exc, "response", None)
    if not (isinstance(response, dict) and "Error" in response):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return response["Error"].get("Code") in THROTTLING_CODES or status == 429 or status >= 500


def _transient_one(exc: BaseException) -> bool:
    if type(exc).__name__ in TRANSIENT_NAMES:
        return True
    # botocore's EndpointConnectionError, ReadTimeoutError and kin.
    if type(exc).__module__.startswith("botocore") and "Connection" in type(exc).__name__:
        return True
    if type(exc).__module__.startswith("botocore") and "Timeout" in type(exc).__name__:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def transient(exc: BaseException) -> bool:
    """True when `exc`, or an error it was raised from, can clear up on a later try.

    fgid's usage and failure errors are final by design: a bad setting or a missing model file
    does not change between tries."""
    if isinstance(exc, (UsageError, FailureError)):
        return False
    chain = list(_chain(exc))
    # The store's own answer is the most specific: s3fs wraps it in a generic OSError (EIO).
    for error in chain:
        verdict = _service_verdict(error)
        if verdict is not None:
            return verdict
    return any(_transient_one(e) for e in chain)


def describe(exc: BaseException) -> str:
    """'IsADirectoryError: [Errno 21] Is a directory: ...' - what the run shows as the cause."""
    return f"{type(exc).__name__}: {exc}"


def retry_transient(task, task_run, state) -> bool:
    """A task's `retry_condition_fn`: retry only what can clear up; say why not otherwise."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no exception to judge: let the retry policy decide
        return True
    if not isinstance(exc, BaseException) or transient(exc):
        return True
    from prefect import get_run_logger

    get_run_logger().warning("not retried, it cannot clear up by itself: %s", describe(exc))
    return False


# The retry settings of every shard task: only what can clear up, three times (~45 s in all;
# botocore absorbs short storage outages itself, these cover longer ones).
SHARD_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_transient,
}
