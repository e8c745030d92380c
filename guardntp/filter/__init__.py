"""The packet-filter front end: every packet's fate is decided here before the responder runs.

Stages, in order (``pipeline.py``): sanity -> anti-reflection -> access lists and
blocklist -> authentication -> token buckets (source, prefix, global) -> over the
limit: leak, RATE KoD or drop -> responder. ``docs/filter.md`` describes them.
"""
