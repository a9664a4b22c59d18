"""Files written whole or not at all: checkpoints, converted weights, results and reports.

A crash, a kill or an error while writing leaves no partial file, and an existing file as it was.
"""
import contextlib
import os
import uuid
from typing import BinaryIO, Callable, Union

__all__ = ['atomic_write', 'atomic_write_text']

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a new temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    The file gets the permissions the umask gives any new file (``tempfile.mkstemp`` would make it 0600).
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f'.{name}.{uuid.uuid4().hex[:8]}.tmp')
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """``atomic_write`` of ``text`` in UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))
