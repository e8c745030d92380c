"""The blocklist: entries an operator (or the server itself) adds at run time.

* ``entries``  values, durations, import files and firewall exports (pure)
* ``auto``     which sources stay over their limit long enough to block (pure)
* ``store``    the SQLite file under the state directory, and its change log (the edge)
* ``live``     the running server's timer: the store's changes -> ``Pipeline.write_blocklist``

``guardntp block ...`` (``commands/block.py``) edits the store; a running server
picks every change up within a second, with no restart and no bucket lost.
"""
