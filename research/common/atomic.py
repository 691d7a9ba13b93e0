"""Writing a file so that readers see the old file or the complete new one, never half of one."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """An open temp file beside `path` for the `with` block, renamed to `path` when the block
    ends without an exception and removed otherwise.

    A failed or interrupted run (full disk, read error, kill) leaves no partial file under the
    final name and keeps an older one there intact. `open_kwargs` go to `open` (text files:
    `newline`, `encoding`).
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
