"""`python -m shardify` runs the CLI."""

from shardify.cli import run

run()
