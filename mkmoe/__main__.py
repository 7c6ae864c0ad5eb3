"""`python -m mkmoe` runs the mkmoe command line."""

from mkmoe.cli import main

main()
