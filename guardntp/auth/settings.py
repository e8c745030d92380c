"""The ``[auth]`` configuration section, and the edge that turns it into an authenticator.

::

    [auth]
    key_file = "/etc/guardntp/keys"     # chrony format; relative to the config file
    require = ["10.20.0.0/16"]          # unauthenticated requests from here are dropped
    optional = ["10.20.99.0/24"]        # ...except from here (longest prefix wins)
    hmac_sha256_key_id = 42             # key 42 = HMAC-SHA256 with the secret in $NTP_SECRET_KEY

Rule: :func:`parse_auth_section` is pure (a TOML table in, :class:`AuthSettings` or a
:class:`~guardntp.config.ConfigError` out); :func:`authenticator_for` reads the key
file and the environment. ``guardntp serve --key-file FILE`` overrides ``key_file``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..filter.acl import parse_network
from ..netaddr import BadAddress
from .keys import MAX_KEY_ID, Key, KeyFileError, KeyType, describe, key_from_text, load_key_file
from .server import KeyAuthenticator, Network

log = logging.getLogger("guardntp.auth")

#: The original design's variable: the HMAC-SHA256 secret (HEX:..., ASCII:... or text).
SECRET_ENV = "NTP_SECRET_KEY"
KNOWN_KEYS = ("key_file", "require", "optional", "hmac_sha256_key_id")


@dataclass(frozen=True)
class AuthSettings:
    key_file: str = ""
    require: tuple[Network, ...] = ()
    optional: tuple[Network, ...] = ()
    hmac_sha256_key_id: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.key_file) or self.hmac_sha256_key_id is not None


def parse_auth_section(table: Mapping[str, Any], path: str = "<config>") -> AuthSettings:
    """Validate ``[auth]``. Raises :class:`ConfigError` as ``path: auth.KEY: why``."""
    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: auth.{key}: {message}")

    for key in table:
        if key not in KNOWN_KEYS:
            raise fail(key, "unknown setting (known: " + ", ".join(KNOWN_KEYS) + ")")
    key_file = table.get("key_file", "")
    if not isinstance(key_file, str):
        raise fail("key_file", "must be a string (a file path)")
    networks: dict[str, tuple[Network, ...]] = {}
    for name in ("require", "optional"):
        value = table.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise fail(name, 'must be a list of CIDRs, e.g. ["192.0.2.0/24", "2001:db8::/32"]')
        try:
            networks[name] = tuple(parse_network(item) for item in value)
        except (ValueError, BadAddress) as error:
            raise fail(name, str(error)) from None
    key_id = table.get("hmac_sha256_key_id")
    if key_id is not None and (isinstance(key_id, bool) or not isinstance(key_id, int)
                               or not 0 <= key_id <= MAX_KEY_ID):
        raise fail("hmac_sha256_key_id", f"must be a whole number from 0 to {MAX_KEY_ID}")
    settings = AuthSettings(key_file, networks["require"], networks["optional"], key_id)
    if settings.require and not settings.enabled:
        raise fail("require", "needs keys: set auth.key_file or auth.hmac_sha256_key_id "
                   "(otherwise every client in these networks is refused)")
    return settings


def resolve_key_file(key_file: str, config_path: str) -> Path:
    """A relative ``key_file`` is relative to the configuration file's directory."""
    path = Path(key_file).expanduser()
    if path.is_absolute() or config_path.startswith("<") or config_path.startswith("--"):
        return path
    return Path(config_path).parent / path


def hmac_key_from_env(key_id: int, environ: Mapping[str, str]) -> Key:
    """Key ``key_id`` as HMAC-SHA256 with the secret from ``$NTP_SECRET_KEY``."""
    text = environ.get(SECRET_ENV, "")
    if not text.strip():
        raise KeyFileError(f"{SECRET_ENV} is not set or empty (it holds the HMAC-SHA256 "
                           f"secret for key {key_id}: HEX:..., ASCII:... or text)")
    return key_from_text(key_id, KeyType.HMAC_SHA256, text, SECRET_ENV)


# ----------------------------------------------------------------------------- edge

def load_keys(settings: AuthSettings, config_path: str,
              environ: Mapping[str, str] = os.environ) -> dict[int, Key]:
    """The key file's keys plus the HMAC-SHA256 key from the environment, if configured."""
    keys: dict[int, Key] = {}
    if settings.key_file:
        keys.update(load_key_file(resolve_key_file(settings.key_file, config_path)))
    if settings.hmac_sha256_key_id is not None:
        key = hmac_key_from_env(settings.hmac_sha256_key_id, environ)
        if key.key_id in keys:
            raise KeyFileError(f"auth.hmac_sha256_key_id = {key.key_id}: key {key.key_id} is "
                               f"already defined at {keys[key.key_id].source}")
        keys[key.key_id] = key
    return keys


def check_auth_config(config: Config) -> str:
    """For ``check-config``: validate ``[auth]`` and its key file (not ``$NTP_SECRET_KEY``,
    which the checking shell may not have). A one-line summary, or :class:`ConfigError`."""
    settings = parse_auth_section(config.extra.get("auth", {}), config.path)
    if not settings.enabled:
        return "no authentication keys"
    parts = []
    if settings.key_file:
        parts.append(describe(load_key_file(resolve_key_file(settings.key_file, config.path))))
    if settings.hmac_sha256_key_id is not None:
        parts.append(f"key {settings.hmac_sha256_key_id} HMAC-SHA256 from ${SECRET_ENV}")
    required = len(settings.require)
    parts.append(f"authentication required from {required} network{'s' * (required != 1)}")
    return "; ".join(parts)


def authenticator_for(config: Config, key_file_flag: str | None = None,
                      environ: Mapping[str, str] = os.environ) -> KeyAuthenticator | None:
    """The authenticator for ``config`` (None when no keys are configured).

    Raises :class:`ConfigError` (a bad ``[auth]`` section) or its subclass
    :class:`KeyFileError` (a bad key file or ``NTP_SECRET_KEY``), one line each.
    """
    settings = parse_auth_section(config.extra.get("auth", {}), config.path)
    config_path = config.path
    if key_file_flag:
        settings = AuthSettings(key_file_flag, settings.require, settings.optional,
                                settings.hmac_sha256_key_id)
        config_path = "--key-file"
    if not settings.enabled:
        return None
    keys = load_keys(settings, config_path, environ)
    for key in keys.values():
        if key.is_short:
            log.warning("key %d (%s) is shorter than 80 bits: use at least 16 random bytes",
                        key.key_id, key.source)
    log.info("authentication: %s; required from %s", describe(keys),
             ", ".join(str(net) for net in settings.require) or "nobody")
    return KeyAuthenticator(keys, settings.require, settings.optional)
