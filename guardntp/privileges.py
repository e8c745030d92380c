"""Dropping root after the sockets are bound (``--user``, ``--group``).

Rule: binding port 123 is the only thing guardntp needs root for, so the server
binds first and then becomes ``--user`` for good: supplementary groups cleared,
then the group, then the user (in that order: once the uid is gone, changing
groups is no longer allowed). ``setuid`` as root sets the real, effective and
saved uid together, and the kernel clears every capability with it, so there is
no way back; :func:`drop_privileges` checks that ``setuid(0)`` now fails, the
way OpenSSH does, rather than trusting it. ``PR_SET_NO_NEW_PRIVS`` also closes
setuid binaries to the process and its children.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass

#: <linux/prctl.h>
PR_SET_NO_NEW_PRIVS = 38


class PrivilegeError(Exception):
    """The requested user or group cannot be used; one line for the operator."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    gid: int


def resolve_identity(user: str, group: str = "") -> Identity:
    """``user`` and ``group`` by name or number; the group defaults to the user's own."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        if not user.isdigit():
            raise PrivilegeError(f"--user {user!r}: no such user") from None
        uid, gid = int(user), int(user)
    else:
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise PrivilegeError(f"--group {group!r}: no such group") from None
    return Identity(user, uid, gid)


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good. Raises :class:`PrivilegeError`."""
    if os.geteuid() != 0:
        if (os.getuid(), os.geteuid(), os.getgid()) == (identity.uid,) * 2 + (identity.gid,):
            return  # already that user (e.g. started by systemd with User=)
        raise PrivilegeError(f"--user {identity.user}: only root can change user "
                             f"(running as uid {os.geteuid()})")
    # Imported now, before the drop: the interpreter's own files need not be readable
    # by the new user (a Python under /root, say).
    import ctypes.util  # noqa: F401
    try:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as error:
        raise PrivilegeError(f"cannot become {identity.user} (uid {identity.uid}, "
                             f"gid {identity.gid}): {error.strerror}") from None
    if identity.uid != 0:
        _check_no_way_back()
    _no_new_privileges()


def _check_no_way_back() -> None:
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("setuid(0) still works after dropping privileges; refusing to run")


def _no_new_privileges() -> None:
    """Best effort: without it the drop above still holds; it forbids setuid executables."""
    import ctypes  # imported (and so read from disk) while still root, see drop_privileges
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def chown_for(path: str, identity: Identity) -> None:
    """Give the state directory to the user we are about to become (we may have made it).

    Never through a symlink: a link there is refused, and the change is made on the
    name itself (``lchown``), so a link swapped in after the check gets the new owner
    instead of what it points to. Raises :class:`PrivilegeError` or :class:`OSError`.
    """
    if os.geteuid() != 0:
        return
    if stat.S_ISLNK(os.lstat(path).st_mode):
        raise PrivilegeError(f"{path} is a symbolic link; refusing to give what it points "
                             f"to to {identity.user}")
    os.chown(path, identity.uid, identity.gid, follow_symlinks=False)


def status_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status (for checks and tests)."""
    ids: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, values = line.partition(":")
            if name in ("Uid", "Gid", "Groups"):
                ids[name] = [int(v) for v in values.split()]
            elif name in ("CapEff", "CapPrm"):
                ids[name] = [int(values.strip(), 16)]
    return ids
