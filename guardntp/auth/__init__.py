"""Symmetric-key authentication: RFC 5905 MACs, RFC 8573 AES-CMAC, and HMAC-SHA256.

Map of the package:

* ``keys``      the key file (chrony's format) -> :class:`~.keys.Key` objects;
                pure, except :func:`~.keys.load_key_file` which reads the file
* ``mac``       computing and checking MACs, no I/O; digests compared in constant time
* ``server``    :class:`~.server.KeyAuthenticator`, the filter pipeline's auth stage
* ``client``    sign/verify callables for ``guardntp query --key-file --key-id``
* ``settings``  the ``[auth]`` configuration section, and the edge that loads keys

Interoperability rules (``shared/docs/protocol-rules.md``, checked against chrony 4.3
``keys.c``/``ntp_auth.c`` and NTPsec 1.2 ``libntp``): a MAC is a 4-byte key id and a
digest; keyed hashes are ``H(key || packet)``; AES-CMAC is ``CMAC(key, packet)``; a
reply carries the request's key id and digest length. HMAC-SHA256 is guardntp's own
scheme (the original design's) and no other implementation speaks it.
"""

from .keys import Key, KeyFileError, KeyType, load_key_file, parse_key_file

__all__ = ["Key", "KeyFileError", "KeyType", "load_key_file", "parse_key_file"]
