"""guardntp: an abuse-resistant public NTP server.

Map of the package (a newcomer's guide):

* ``wire``, ``timestamps``      NTP packets and 64-bit integer time, no I/O
* ``verdicts``                  every packet's one counted reason, and the counters
* ``responder``                 the stateless reply builder (pure)
* ``filter/``                   the packet-filter front end (pure, takes ``now``)
* ``auth/``                     symmetric keys: key files, MACs, the auth stage
* ``clock``, ``timesources/``   what time we serve and how good it is
* ``server``                    sockets and the event loop (the edge); its one-recvmsg
                                loop serves where the compiled one was not built
* ``fastlane``, ``_fastlane.c``  the compiled packet loop: recvmmsg, the filter's common
                                cases, sendmmsg; per-source records and the tables'
                                address index (optional C build)
* ``daemon/``                   the running server: ``Service`` and its one reload path,
                                the settings check shared with check-config, signals and
                                systemd (``operations``), ``--workers N`` as one server
* ``blocklist/``                the persistent blocklist, live refresh, nftables export
* ``control/``                  the Unix control socket behind clients / stats / reload
* ``statedir``                  the state directory's files: no symlinks, fchown on fds
* ``metrics``, ``logs``, ``privileges``, ``systemd``, ``signals``
                                running as a service: Prometheus, quiet logs,
                                privilege drop, socket activation
* ``replay/``                   flood captures (scapy) and their replay and report
* ``client``, ``setclock``      the SNTP client behind ``guardntp query``
* ``config``, ``netaddr``       the TOML file and its validation; listen addresses
* ``commands/``, ``cli``        the command line

Layers point one way: ``cli``/``commands`` -> ``daemon`` -> features -> the core
(``docs/design.md``; ``tests/test_layers.py`` holds the rule).
"""

__version__ = "0.1.0"
