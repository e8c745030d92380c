"""The state directory and the files in it: the one place that checks and opens them.

Rule: the documented setup gives the state directory to the service user
(``--user guardntp``), so that user decides what every name *inside* it points
to, and root still works there (``guardntp block ...``, ``serve`` before it
drops privileges). That is safe because no name inside the directory is
trusted: a file is opened with ``O_NOFOLLOW`` and checked on its descriptor (a
regular file with no other hard link: a hard link to one of root's files is the
same attack as a symlink), and its owner and mode are changed on that
descriptor, never by name.

The directory itself (:func:`prepare_state_dir`) must not be a symlink, must be
a directory, must be writable by its owner alone (a group- or world-writable one
lets others plant names), and must belong to us or to root. Root accepts a
directory of another user as well: that user can only plant names, and names
are never followed. Its ancestors are the operator's to keep safe (/var/lib).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class StateDirError(Exception):
    """A state directory or state file that must not be used; one line naming it and why."""


def prepare_state_dir(path: Path, create: bool = True) -> Path:
    """Check ``path`` as a state directory, making it (mode 0750) if it is missing and
    ``create`` is true; returns ``path``. Raises :class:`StateDirError`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise StateDirError(f"state directory {path} does not exist") from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o750)
        except FileExistsError:
            pass  # made meanwhile (another guardntp): checked like any other
        except OSError as error:
            raise StateDirError(f"state directory {path}: cannot create it: "
                                f"{error.strerror}") from None
        return prepare_state_dir(path, create=False)
    except OSError as error:
        raise StateDirError(f"state directory {path}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(f"state directory {path} is a symbolic link; "
                            "give the directory it points to")
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state directory {path} is not a directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(f"state directory {path} is writable by its group or by others "
                            f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod go-w it")
    euid = os.geteuid()
    if euid != 0 and info.st_uid not in (euid, 0):
        raise StateDirError(f"state directory {path} belongs to uid {info.st_uid}, "
                            f"not to you (uid {euid}) or root")
    return path


def open_state_file(path: Path, create: bool = False) -> int:
    """An ``O_PATH`` descriptor of ``path``, a regular file with no other hard link,
    made first (empty, mode 0600) if it is missing and ``create`` is true. The caller
    closes the descriptor; it serves :func:`os.fstat` and :func:`hand_over_fd`.

    A missing file raises :class:`FileNotFoundError`; a symlink (never followed) or
    anything else wrong raises :class:`StateDirError`. ``O_PATH`` opens nothing for
    reading or writing (a FIFO or a device is harmless), and closing it keeps the
    ``fcntl`` locks SQLite holds on the same file, which closing any ordinary
    descriptor of it would drop for the whole process.
    """
    if create:
        try:
            # O_EXCL: a name that exists, even as a dangling symlink, is left to the check.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise StateDirError(f"{path}: cannot create it: {error.strerror}") from None
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StateDirError(f"{path}: {error.strerror}") from None
    try:
        _check(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_state_file(path: Path) -> bool:
    """False if there is no ``path``; True if it is a regular file with no other hard
    link; otherwise :class:`StateDirError`. Looks at the name without opening it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise StateDirError(f"{path}: {error.strerror}") from None
    _check(path, info)
    return True


def hand_over_fd(fd: int, uid: int, gid: int, mode: int | None = None) -> None:
    """Give the open file to ``uid``:``gid`` (and set ``mode``), whatever its name points
    to by now. ``fd`` may be an ``O_PATH`` descriptor, which ``fchown`` refuses: the
    change goes through ``/proc/self/fd``, which names exactly the open file."""
    target = f"/proc/self/fd/{fd}"
    os.chown(target, uid, gid)
    if mode is not None:
        os.chmod(target, mode)


def restrict_mode(fd: int, allowed: int = 0o600) -> None:
    """Take away any permission outside ``allowed`` from the open file (one an older
    version made 0644, say), when it is ours or we are root; otherwise leave it."""
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~allowed and os.geteuid() in (0, info.st_uid):
        os.chmod(f"/proc/self/fd/{fd}", mode & allowed)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check(path: Path, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(f"{path} is a symbolic link; refusing to follow it")
    if not stat.S_ISREG(info.st_mode):
        raise StateDirError(f"{path} is {_kind(info.st_mode)}, not a regular file")
    if info.st_nlink != 1:
        raise StateDirError(f"{path} has {info.st_nlink} hard links; refusing a file "
                            "that is also somewhere else")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "something else"
