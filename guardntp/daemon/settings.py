"""Every section a running server uses, checked in one place.

Rule: ``check-config``, ``serve`` and every reload (SIGHUP, ``guardntp reload``,
``systemctl reload``) call :func:`check_sections`, so they accept and refuse
exactly the same files. ``config.py`` checks the core sections as it parses;
the features' own sections (``[blocklist]``, ``[control]``, ``[auth]`` and its
key file, ``[nts]``) are checked here, by the features' own parsers, before anything is
applied. The only difference is the secret in ``$NTP_SECRET_KEY``: ``serve``
and reload need it, while ``check-config`` runs from a shell that may not have it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..auth.settings import check_auth_config
from ..blocklist.auto import AutoPolicy, BadAutoSettings, parse_auto_policy
from ..config import Config, ConfigError
from ..control.service import parse_control_settings
from ..nts.settings import BadNtsSettings, NtsSettings, parse_nts_settings


@dataclass(frozen=True)
class Sections:
    """The features' sections of one configuration, parsed."""

    auto_blocking: AutoPolicy
    control_enabled: bool
    #: One line on the keys, e.g. "no authentication keys".
    auth_summary: str
    nts: NtsSettings


def check_sections(config: Config) -> Sections:
    """Parse the features' sections; raises :class:`ConfigError` naming the file and key."""
    try:
        auto = parse_auto_policy(config.extra.get("blocklist", {}))
    except BadAutoSettings as error:
        raise ConfigError(f"{config.path}: {error}") from None
    try:
        control = parse_control_settings(config.extra.get("control", {}))
    except ValueError as error:
        raise ConfigError(f"{config.path}: {error}") from None
    try:
        nts = parse_nts_settings(config.extra.get("nts", {}), config.path)
    except BadNtsSettings as error:
        raise ConfigError(f"{config.path}: {error}") from None
    return Sections(auto, control, check_auth_config(config), nts)
