"""Local scratch folders (under TMPDIR) that a killed run does not leave behind for good.

Sorting, planning and finalize spill to temporary folders; at ten million inputs finalize's is
20 GB. A folder is named by kind, host and pid, and making one first deletes the folders of its
kind that a dead process of this host left (SIGKILL skips every cleanup). Another host's, or a
live process's, are never touched.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile

from storage.atomic import pid_alive


def scratch(kind: str) -> tempfile.TemporaryDirectory:
    """`with scratch("sort") as folder:` a new folder, removed when the block ends."""
    root, here = tempfile.gettempdir(), socket.gethostname()
    prefix = f"fgid-{kind}-"
    for left in glob.glob(os.path.join(glob.escape(root), prefix + "*")):
        host, pid = _owner(os.path.basename(left)[len(prefix) :])
        if host == here and pid is not None and not pid_alive(pid):
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{here}-{os.getpid()}-")


def _owner(rest: str) -> tuple[str | None, int | None]:
    """(host, pid) from '<host>-<pid>-<random>' (mkdtemp's random part has no '-')."""
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])
