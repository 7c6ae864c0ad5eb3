"""`python -m mkmerge` runs the mkmerge command line."""

from mkmerge.cli import main

main()
