"""wsctl: operations CLI for the lead-enrichment pipeline.

The library lives in the modules of this package (connections, migrations,
resolution, batches, dispatch); ``wsctl.cli`` is the thin command layer.
"""

__version__ = "0.1.0"
