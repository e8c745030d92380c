"""NTS inside a running server: the master key file, the NTS-KE server, the counters.

Rule: the edge around the pure pieces. The packet path calls :meth:`NtsService.answer`
(the pure :func:`~guardntp.nts.responder.answer` over the keys in force) for an
NTPv4 request that carries an NTS Unique Identifier; the KE server runs on its
own thread; a timer calls :meth:`refresh`, which re-reads or rotates the key
file. Errors at start are :class:`NtsError`, one line each; later ones are
logged and the keys already held stay in force.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..statedir import StateDirError, hand_over_fd, open_state_file
from .cookies import KEY_FILE_NAME, LOCK_FILE_NAME, KeyStore, KeyStoreError
from .extensions import has_unique_identifier
from .ke_server import KE_COUNTERS, KeServer, KeServerError, make_context
from .records import KeSettings
from .responder import NtsCounters, NtsOutcome, NtsVerdict, answer
from .settings import NtsError, NtsSettings

log = logging.getLogger("guardntp.nts")

#: How often the key file is looked at (a changed file, or a rotation that is due).
KEY_REFRESH_S = 10.0
#: A reply's NTP port is advertised only when it is not the standard one.
NTP_PORT = 123


class NtsService:
    KEY_REFRESH_S = KEY_REFRESH_S

    def __init__(self, settings: NtsSettings, state_dir: Path, ntp_port: int = NTP_PORT,
                 wall_s: Callable[[], float] = time.time, serve_ke: bool = True) -> None:
        """``serve_ke=False``: answer NTS requests only (the other ``--workers``: one
        KE server per address, and every worker reads the same key file)."""
        if settings.cert is None or settings.key is None:
            raise NtsError("NTS needs a certificate and its key (nts.cert, nts.key)")
        self.settings = settings
        self.wall_s = wall_s
        self.counters = NtsCounters()
        self.last_error = ""
        try:
            self.store = KeyStore(state_dir, settings.key_period_s, settings.keys_kept,
                                  settings.rotate_keys)
            self.store.refresh(wall_s())
        except (KeyStoreError, StateDirError) as error:
            raise NtsError(f"NTS master keys: {error}") from None
        listen = settings.ke_listen
        self.ke: KeServer | None = None
        if not serve_ke:
            self.ntp_port = ntp_port
            return
        try:
            self.ke = KeServer((listen.host, listen.port), settings.cert, settings.key,
                               lambda: self.store.keys, self._ke_settings(settings, ntp_port),
                               settings.limits)
        except KeServerError as error:
            raise NtsError(str(error)) from None
        self.ntp_port = ntp_port

    def hand_over(self, uid: int, gid: int) -> None:
        """Give the key file and its lock to the user the server is about to become,
        so that it can rotate the keys (by descriptor, never following a name)."""
        for name in (KEY_FILE_NAME, LOCK_FILE_NAME):
            try:
                fd = open_state_file(self.store.state_dir / name)
            except FileNotFoundError:
                continue
            except StateDirError as error:
                raise NtsError(f"NTS master keys: {error}") from None
            try:
                hand_over_fd(fd, uid, gid, 0o600)
            except OSError as error:
                raise NtsError(f"NTS master keys: {self.store.state_dir / name}: "
                               f"{error.strerror}") from None
            finally:
                os.close(fd)

    @staticmethod
    def _ke_settings(settings: NtsSettings, ntp_port: int) -> KeSettings:
        return KeSettings(ntp_server=settings.ntp_server or None, ntp_port=ntp_port,
                          cookies=settings.cookies)

    def start(self) -> None:
        """Bind the KE port and start its thread; raises :class:`NtsError`."""
        if self.ke is None:
            return
        try:
            self.ke.start()
        except KeServerError as error:
            raise NtsError(str(error)) from None
        host, port = self.ke.address
        log.info("NTS-KE on %s:%d (TLS 1.3, ntske/1), %d master keys in %s", host, port,
                 len(self.store.keys.by_id), self.store.path)

    def stop(self) -> None:
        if self.ke is not None:
            self.ke.stop()

    # ------------------------------------------------------------------ packet path

    def answer(self, request: bytes) -> NtsVerdict:
        verdict = answer(request, self.store.keys)
        self.counters.add(verdict)
        return verdict

    @staticmethod
    def claims(request: bytes) -> bool:
        return has_unique_identifier(request)

    def decide(self, request: bytes) -> tuple[str, Callable[[bytes], bytes] | None]:
        """The packet path's question, for a request :meth:`claims`: ``("reply",
        finish)``, ``("nak", finish)`` or ``("drop", None)``, where ``finish(header)``
        appends the extension fields to the final 48-byte header (time reply, RATE
        KoD, or the NTSN KoD of a NAK)."""
        verdict = self.answer(request)
        if verdict.outcome is NtsOutcome.DROP:
            return "drop", None

        def finish(header: bytes) -> bytes:
            return header + verdict.extensions(header)

        return ("nak" if verdict.outcome is NtsOutcome.NAK else "reply"), finish

    # ------------------------------------------------------------------ timers, reload

    def refresh(self) -> None:
        try:
            self.store.refresh(self.wall_s())
            self.last_error = ""
        except (KeyStoreError, StateDirError) as error:
            if str(error) != self.last_error:
                log.error("NTS master keys: %s (the keys held stay in force)", error)
            self.last_error = str(error)

    def prepare_reload(self, settings: NtsSettings) -> Callable[[], None]:
        """Check ``settings`` and load the certificate and key they name (re-read even
        when the names did not change: a renewed certificate). Returns what applies
        them, which cannot fail; raises :class:`NtsError` and changes nothing."""
        if settings.cert is None or settings.key is None:
            raise NtsError("turning NTS off needs a restart")
        try:
            context = make_context(settings.cert, settings.key)
        except KeServerError as error:
            raise NtsError(str(error)) from None
        if (settings.ke_listen, settings.key_period_s, settings.keys_kept,
                settings.rotate_keys) != (self.settings.ke_listen, self.settings.key_period_s,
                                          self.settings.keys_kept, self.settings.rotate_keys):
            log.warning("reload: nts.ke_listen and the key rotation settings need a restart")

        def apply() -> None:
            if self.ke is not None:
                self.ke.use_context(context)
                self.ke.reconfigure(self._ke_settings(settings, self.ntp_port),
                                    settings.limits)
            self.settings = settings

        return apply

    def report(self) -> dict[str, Any]:
        """What ``guardntp stats`` and the metrics show."""
        counts = self.ke.counters if self.ke is not None else {}
        return {"ke": {name: counts.get(name, 0) for name in KE_COUNTERS} if self.ke else {},
                "ntp": self.counters.snapshot(),
                "master_keys": len(self.store.keys.by_id), "rotations": self.store.rotations,
                "key_error": self.last_error}
