"""Subcommands of `sgsd`; see `sgsd/cli.py` for the module contract."""
