"""`python -m batchgate`: the command line (as the `batchgate` console script)."""

from batchgate.cli import main

main()
