"""What a benchmark leaves behind when a time limit stops it: every thread's stack."""

from __future__ import annotations

import faulthandler
import signal


def dump_stacks_on_term() -> None:
    """On SIGTERM (what `timeout` sends first), print every thread's Python stack to stderr,
    then end as SIGTERM would have: a step that ran out of time says where it was."""
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
