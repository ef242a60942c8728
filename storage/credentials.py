"""Storage credentials and endpoints, read from the environment only.

s3:// uses the standard variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN /
AWS_DEFAULT_REGION (read by botocore itself) and FGID_S3_ENDPOINT_URL for S3-compatible servers
(SeaweedFS, MinIO, Ceph). Nothing here is ever logged.
"""

from __future__ import annotations

import os


def storage_options(protocol: str | None) -> dict:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("FGID_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}
