"""All-or-nothing writes: a file or a folder is written beside its target and swapped in only when complete.

A failure (an exception, a full disk, a kill) before the swap leaves the previous file or folder as it was. What an
interrupted write leaves behind is a hidden sibling named ``.<name>.partial-*``; the next successful write of the same
target removes it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "export"
    >>> with replacing_directory(target) as staging:
    ...     _ = (staging / "a.txt").write_text("new")
    >>> sorted(p.name for p in target.iterdir())
    ['a.txt']
    >>> try:
    ...     with replacing_directory(target) as staging:
    ...         raise OSError("disk full")
    ... except OSError:
    ...     pass
    >>> (target / "a.txt").read_text()
    'new'
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two existing paths in one step
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def partial_siblings(target: Path) -> list[Path]:
    """Leftovers of interrupted writes of ``target`` (hidden siblings ``.<name>.partial-*``)."""
    return sorted(target.parent.glob(f".{target.name}{PARTIAL}*"))


def foreign_files(folder: str | Path, ours: Iterable[str] = ()) -> list[str]:
    """Files under ``folder`` (relative POSIX paths, links included) that are not in ``ours``; [] for no folder.

    What a write of ``folder`` as a whole would delete beyond its own previous output: callers refuse to replace a
    folder for which this is not empty, so that no file of the user's disappears silently.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "model.safetensors").write_bytes(b"")
        >>> _ = (folder / "notes.txt").write_text("mine")
        >>> foreign_files(folder, ours=["model.safetensors"]), foreign_files(folder / "missing")
        (['notes.txt'], [])
    """
    folder, ours = Path(folder), set(ours)
    if not folder.is_dir():
        return []
    found = (path.relative_to(folder).as_posix() for path in folder.rglob("*")
             if path.is_symlink() or not path.is_dir())  # empty folders hold nothing to lose
    return sorted(name for name in found if name not in ours)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a file type that cannot be opened read-only (a socket): nothing of ours
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that the swap never exposes unwritten data."""
    for path in [root] if root.is_file() else [*root.rglob("*"), root]:
        _fsync(path)


@functools.cache
def _renameat2():
    """libc's renameat2, or None: looked up once per process (``find_library`` runs ``ldconfig``)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        _remove(staging)  # now holds the previous version
        return
    # No atomic exchange: move the old one aside first, so that a kill between the two renames leaves it
    # complete under its .partial- name instead of half-deleted.
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}old-", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)  # the previous version goes back to its place, not left under a hidden name
        raise
    _remove(aside)


@contextmanager
def _committed(staging: Path, target: Path, swap: Callable[[Path, Path], None]) -> Iterator[Path]:
    """Yield ``staging``; when the block succeeds flush it, ``swap`` it in for ``target`` and remove leftovers of
    earlier interrupted writes; when it fails remove ``staging`` and leave ``target`` alone."""
    try:
        yield staging
        _fsync_tree(staging)
        swap(staging, target)
        _fsync(target.parent)  # the rename itself survives a power cut
    except BaseException:
        _remove(staging)
        raise
    for leftover in partial_siblings(target):
        _remove(leftover)


@contextmanager
def replacing_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block ends without error it becomes ``target``.

    The previous ``target`` (and everything in it) is replaced as a whole, so no stale file of an older write
    survives. On an error the staging folder is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, not a folder. HINT: choose a folder path for the export.")
    here, real = Path.cwd(), target.resolve()
    if here == real or real in here.parents:
        # The swap would leave this process inside the removed previous folder.
        raise ValueError(f"{target} is the working directory (or holds it), so it cannot be replaced as a whole. "
                         "HINT: write into a subfolder, e.g. ./export.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the export should look like any other folder
    with _committed(staging, target, _swap_in) as path:
        yield path


@contextmanager
def replacing_file(target: str | Path) -> Iterator[Path]:
    """Yield a path beside ``target`` to write; when the block ends without error it replaces ``target``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> with replacing_file(path) as partial:
        ...     _ = partial.write_bytes(b"weights")
        >>> path.read_bytes()
        b'weights'
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent)
    os.close(fd)
    staging = Path(name)
    staging.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result should look like any other file
    with _committed(staging, target, os.replace) as path:
        yield path
