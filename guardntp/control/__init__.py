"""The local control channel of a running server (``guardntp clients|stats|reload``).

* ``reports``  top talkers and counters from the filter's tables (pure)
* ``channel``  the Unix socket: non-blocking on the server's loop, peer uid checked
* ``merge``    the workers' figures added up into the server's (pure)
* ``service``  the commands bound to a server's pipeline, loop and blocklist; ``setup_control``
"""
