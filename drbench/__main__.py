"""``python -m drbench``: the command line where the ``drbench`` script is not installed (a source checkout)."""

from drbench.cli import main

main()
