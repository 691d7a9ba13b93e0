"""Files that a crash cannot leave half written or locked: `atomic_write` (readers see the old
file or the complete new one), `remove_temp_files` (the debris of a write a kill interrupted)
and `exclusive_lock` (a lock the kernel drops when its holder dies)."""
import contextlib
import fcntl
import os
import re
import shlex
import socket
import sys
import tempfile
import time


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """An open temp file beside `path` (`<name>.<random>.tmp`) for the `with` block, renamed
    to `path` when the block ends without an exception and removed otherwise.

    A failed run (full disk, read error, exception) leaves no partial file under the final name
    and keeps an older one there intact; only a kill leaves the temp file, which
    `remove_temp_files` finds. `open_kwargs` go to `open` (text files: `newline`, `encoding`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                        dir=directory)
    try:
        with os.fdopen(handle, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp made it private (0600)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def remove_temp_files(directory, names=".+"):
    """Delete the temp files that killed `atomic_write`s left in `directory` for final names
    matching the regex `names`; returns their paths. Call it only where no other process is
    writing (under the lock of the run that owns the folder)."""
    pattern = re.compile(rf"(?:{names})\.[a-z0-9_]+\.tmp")
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if pattern.fullmatch(name):
            removed.append(os.path.join(directory, name))
            os.remove(removed[-1])
    return removed


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, holder):
        super().__init__(holder)
        self.holder = holder


_held = {}  # real path of a lock file -> how many blocks of this process hold it


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an flock on the file `path` for the block, with who holds it (pid, host, start time,
    command) written into it for whoever finds it taken; the file is deleted at the end.

    Yields what a previous holder that ended without releasing the lock (a killed process: the
    kernel dropped its flock, the file stayed) had written, else None. Raises LockHeld when
    another process holds the lock. A process may nest blocks on its own lock; the inner ones
    yield None.
    """
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield None
        finally:
            _held[key] -= 1
        return
    fd = _lock_file(path)
    try:
        previous = _read_owner(fd) or None
        command = shlex.join(sys.orig_argv).replace("\n", "\\n")  # one line, even for python -c
        owner = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode("utf-8"), 0)
        _held[key] = 1
        try:
            yield previous
        finally:
            del _held[key]
            with contextlib.suppress(FileNotFoundError):  # before the flock goes: nothing is
                os.remove(path)  # left to report, and no one can lock the deleted file
    finally:
        os.close(fd)  # drops the flock


def _lock_file(path):
    """An open descriptor of `path` with our flock on it; the file may have been deleted by its
    last holder between our open and our flock: then lock the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(fd)
            os.close(fd)
            raise LockHeld(holder) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _read_owner(fd):
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
