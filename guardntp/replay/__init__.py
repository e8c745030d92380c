"""The flood replay harness: captures of documented floods and normal clients, replayed
against the real filter and scored per class (``docs/replay.md``).

Map:

* ``scenarios``  named, seeded, scalable traffic models (pure: events, no bytes, no I/O)
* ``pcap``       classic pcap records and Ethernet/IP/UDP frames as raw bytes
* ``capture``    scenarios -> a pcap plus its sidecars (labels CSV, meta JSON); scapy
                 builds one template frame per kind, every packet is a patched copy
* ``sidecar``    the per-packet labels and the capture's metadata
* ``inprocess``  replay through ``Pipeline`` + ``Responder`` with virtual time
* ``live``       replay with tcpreplay onto ``lo`` of a private network namespace
                 against ``guardntp serve`` or ``chronyd``, replies counted by nftables
* ``report``     text, JSON and PNG; the targets the tests check

Captures carry source addresses from documentation and private ranges only, and
are sent nowhere but into the pipeline in-process or onto ``lo`` inside a private
network namespace.
"""
