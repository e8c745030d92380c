"""The running server, below the command line and above the features.

Rule: layers point one way. ``commands/`` parse arguments and turn
:class:`DaemonError` into exit codes; this package assembles a server from the
features (``blocklist/``, ``control/``, ``metrics``, ``timesources/``) and the
core (``filter/``, ``responder``, ``wire``), runs it, reloads it and, with
``--workers``, runs several as one. Nothing here imports from ``commands``.

- ``errors``: :class:`DaemonError`, one line and an exit status.
- ``settings``: every section a running server uses, checked in one place;
  ``check-config``, start-up and reload all call it.
- ``service``: :class:`Service`, the one place features hook into, and its
  all-or-nothing reload.
- ``operations``: signals, metrics endpoint, privilege drop, systemd notices.
- ``workers``: ``--workers N`` processes on one port, steered by source prefix.
- ``peers``: how worker 0 asks the other workers for their figures, so stats,
  clients and metrics cover the whole server.
"""

from .errors import DaemonError

__all__ = ["DaemonError"]
