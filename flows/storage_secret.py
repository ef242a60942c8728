"""Object-storage credentials from a Prefect Secret block, put into this process's environment."""

from __future__ import annotations

import json
import os

BLOCK_VAR = "FGID_S3_SECRET_BLOCK"
# JSON field in the block -> the variable storage.credentials reads.
FIELDS = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "endpoint_url": "FGID_S3_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
}


def load_storage_secret(block_name: str | None = None) -> bool:
    """Export the Secret block named by `block_name` (or $FGID_S3_SECRET_BLOCK) to os.environ.

    The block holds JSON {"key": .., "secret": .., "endpoint_url": ..} ("token", "region"
    optional). Values from the block win over variables already set: naming a block is the
    explicit choice. Returns False when no block is named. The values go to the environment
    only, never to flow parameters or logs; errors name fields, never values."""
    name = block_name or os.environ.get(BLOCK_VAR)
    if not name:
        return False
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"Secret block {name!r} does not hold JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"Secret block {name!r} must hold a JSON object")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise ValueError(f"Secret block {name!r}: unknown fields {unknown}; known {sorted(FIELDS)}")
    if not value.get("key") or not value.get("secret"):
        raise ValueError(f"Secret block {name!r} needs both 'key' and 'secret'")
    for field, var in FIELDS.items():
        if value.get(field):
            os.environ[var] = str(value[field])
    return True
