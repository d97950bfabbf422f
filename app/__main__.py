"""``python -m app``: the same command line as ``kimi-pool``."""

from app.cli import main

main()
