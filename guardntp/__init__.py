"""guardntp: an abuse-resistant public NTP server.

Map of the package (a newcomer's guide):

* ``wire``, ``timestamps``      NTP packets and 64-bit integer time, no I/O
* ``responder``                 the stateless reply builder (pure)
* ``filter/``                   the packet-filter front end (pure, takes ``now``)
* ``clock``, ``timesources/``   what time we serve and how good it is
* ``server``                    sockets and the event loop (the edge)
* ``fastio``                    batched recvmmsg/sendmmsg for the server's sockets
* ``workers``                   ``--workers N``: processes on one port, steered by prefix
* ``client``                    the SNTP client behind ``guardntp query``
* ``config``                    the TOML file and its validation
* ``commands/``, ``cli``        the command line
"""

__version__ = "0.1.0"
