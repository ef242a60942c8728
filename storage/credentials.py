"""Storage credentials and endpoints, read from the environment only.

s3:// uses the standard variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN /
AWS_DEFAULT_REGION and FGID_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) for S3-compatible servers
(SeaweedFS, MinIO, Ceph). With none set, botocore's own chain applies (profiles, instance
roles). A Prefect Secret block can fill these variables (flows/storage_secret.py); storage
itself never talks to Prefect. Nothing here is ever logged, and credentials never travel inside
URLs.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

S3_PROTOCOLS = ("s3", "s3a")
KEYS = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
ENDPOINT_VARS = ("FGID_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


def storage_options(protocol: str | None) -> dict:
    """fsspec options for `protocol`, from the environment as it is now.

    Keys are passed explicitly (not left to botocore's lookup) so that fsspec's per-options
    instance cache follows the environment: new credentials give a new client, not a stale one.
    Listing caches are off because other processes (shard workers) write beside us."""
    if protocol not in S3_PROTOCOLS:
        return {}
    options: dict = {"use_listings_cache": False}
    options.update({opt: os.environ[var] for opt, var in KEYS.items() if os.environ.get(var)})
    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    client: dict = {}
    if endpoint:
        client["endpoint_url"] = endpoint
    if os.environ.get("AWS_DEFAULT_REGION"):
        client["region_name"] = os.environ["AWS_DEFAULT_REGION"]
    if client:
        options["client_kwargs"] = client
    return options


# Query parameters that carry a secret: S3/GCS presigned URLs, Azure SAS tokens, OAuth tokens.
SECRET_QUERY = frozenset(
    {
        "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
        "x-goog-signature", "x-goog-credential", "sig", "token", "access_token",
    }
)  # fmt: skip


# fsspec chains links with "::"; an IPv6 literal ("http://[::1]/x") has it inside brackets.
CHAIN_LINK = re.compile(r"::(?![^\[]*\])")


def check_url(url: str) -> None:
    """Refuse a URL that carries credentials (user:secret@host, a presigned query string).

    Every link of an fsspec chain (`simplecache::s3://...`) is checked. Such a URL would end up
    in flow parameters, plans, shard indexes and logs; the message never repeats it."""
    for link in CHAIN_LINK.split(str(url)):
        parts = urlsplit(link)
        names = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if "@" in parts.netloc or names & SECRET_QUERY:
            scheme = f"{parts.scheme}://" if parts.scheme else "a"
            raise ValueError(
                f"{scheme} URL with embedded credentials refused; set them in the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a Prefect Secret block"
            )
