"""Wake on writes to a directory's files (Linux inotify, via ctypes).

Used by the SQLite stream to wake the moment another process writes the
database or its WAL, instead of polling often. Where inotify is missing
(not Linux, or the call fails), :func:`open_watch` returns ``None`` and the
caller polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


class DirectoryWatch:
    """A readable file descriptor that becomes ready when a file in the
    directory is written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_watch(directory: str) -> DirectoryWatch | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(directory), IN_MODIFY) < 0:
        os.close(fd)
        return None
    return DirectoryWatch(fd)
