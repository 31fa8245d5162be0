"""``python -m certpulse``: the same as the ``certpulse`` command."""

from certpulse.cli import main

main()
