"""`python -m mkstack` runs the mkstack command line."""

from mkstack.cli import main

main()
