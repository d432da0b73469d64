"""A log file that many processes append to at once, rotated by size.

The standard ``RotatingFileHandler`` is not safe across processes: two workers may both rotate,
or keep writing to a renamed file. :class:`SharedFileHandler` serializes writers with ``flock``
on a lock file next to the log, follows rotations done by other processes, and writes each record
with a single ``os.write`` on an ``O_APPEND`` descriptor.
"""

from __future__ import annotations

import fcntl
import logging
import os

MAX_FILE_BYTES = 50 * 1024 * 1024  # a log file is rotated before it grows past this
BACKUP_COUNT = 5  # rotated files kept: <name>.1 (newest) .. <name>.5


class SharedFileHandler(logging.Handler):
    """Appends one line per record to ``path``; many processes may share the file.

    Each record is written with one ``os.write`` on an ``O_APPEND`` descriptor while holding an
    exclusive ``flock`` on ``<path>.lock`` (a file that is never rotated, so every process locks
    the same inode). Under the lock the writer reopens ``path`` if another process has rotated it
    (its inode changed), and rotates it itself when the line would take it past
    :data:`MAX_FILE_BYTES`: no line is interleaved, lost or written twice. A forked child opens
    its own descriptors, since an inherited one would share the parent's lock.
    """

    def __init__(self, path: str, *, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._path = path
        self._pid = -1
        self._fd = -1
        self._lock_fd = -1
        self._open()  # the files exist from the start, even before the first error

    def _open(self) -> None:
        self._close_fds()
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        self._lock_fd = os.open(self._path + ".lock", flags, 0o644)
        self._fd = os.open(self._path, flags | os.O_APPEND, 0o644)
        self._pid = os.getpid()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    def _reopen_log(self) -> None:
        os.close(self._fd)
        self._fd = -1
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def _rotate(self) -> None:
        for number in range(BACKUP_COUNT - 1, 0, -1):
            older = f"{self._path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self._path}.{number + 1}")
        os.replace(self._path, f"{self._path}.1")
        self._reopen_log()

    def write(self, data: bytes) -> None:
        if self._pid != os.getpid():
            self._open()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            opened = os.fstat(self._fd)
            try:
                named = os.stat(self._path)
            except FileNotFoundError:  # removed by hand: start a new file
                named = None
            if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                self._reopen_log()
                opened = os.fstat(self._fd)
            if opened.st_size > 0 and opened.st_size + len(data) > MAX_FILE_BYTES:
                self._rotate()
            view = memoryview(data)
            while view:  # a regular file takes it all at once unless the disk is full
                view = view[os.write(self._fd, view) :]
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write((self.format(record) + "\n").encode())
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._pid == os.getpid():
                self._close_fds()
            self._pid = -1
        finally:
            self.release()
        super().close()

    def abandon(self) -> None:
        """In a forked child: let go of the parent's descriptors without writing."""
        self._close_fds()
        self._pid = -1
