"""The ``owl2`` command line."""
