"""``python -m llmsample.cli ...`` runs the ``llmsample`` command."""

import sys

from llmsample.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
