"""Atomic file writes: a reader (or a later run after a crash) never sees half a file."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator


def umask_mode(directory: bool = False) -> int:
    """The permissions an ordinary new file or directory gets. tempfile makes private ones
    (0600 / 0700), which is wrong for a finished model file."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is renamed to `path`, on any error it
    is removed. The name `.NAME.partial-XXXX` marks it as never to be trusted."""
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; an unreadable or non-UTF-8 file is a one-line Qwen2Error."""
    from .errors import Qwen2Error

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise Qwen2Error(f"{path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise Qwen2Error(f"cannot read {path}: {e.strerror or e}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling directory `.NAME.partial-XXXX` to fill; on success it replaces `path`
    (a directory already there is removed only once the new one is in place, and put back if that
    fails), on any error it is removed: a reader never sees half a directory."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield tmp
        _make_readable(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(tmp: str) -> None:
    """mkdtemp makes a private 0700 directory; give the finished one ordinary permissions."""
    os.chmod(tmp, umask_mode(directory=True))
    for name in os.listdir(tmp):
        file = os.path.join(tmp, name)
        if os.path.isfile(file):
            os.chmod(file, umask_mode())


def _replace_dir(src: str, dst: str) -> None:
    if os.path.isdir(dst):
        old = dst + ".old-" + os.path.basename(src)
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old, dst)  # put the previous directory back: a failed write changes nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def cache_dir() -> str:
    """Where qwen2 keeps what it makes once per machine (converted models, built kernels):
    `$QWEN2_CACHE`, default ~/.cache/qwen2."""
    return os.environ.get("QWEN2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2")
