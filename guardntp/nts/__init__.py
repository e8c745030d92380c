"""Network Time Security (RFC 8915): NTS-KE and NTS-protected NTPv4.

* ``records``     NTS-KE records, limits on reading them, the server's negotiation (pure)
* ``extensions``  NTPv4 extension fields for NTS; ``has_unique_identifier`` (pure)
* ``aead``        AEAD_AES_SIV_CMAC_256/512 through ``cryptography``'s AESSIV
* ``cookies``     stateless cookies under rotating master keys (pure) and the key
                  file ``<state_dir>/nts-keys`` (``KeyStore``, the edge)
* ``responder``   ``answer(request, keys) -> NtsVerdict`` for the UDP server (pure)
* ``client``      the client side of an NTS exchange (pure)
* ``limits``      admission control for NTS-KE connections (pure)
* ``ke_server``   the NTS-KE TLS 1.3 server, one selector thread (edge)
* ``ke_client``   an NTS-KE client (edge; ``guardntp query --nts``, tests)

See ``docs/nts.md``.
"""
