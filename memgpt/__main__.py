"""``python -m memgpt demo`` runs the main demonstration; ``--help`` lists the commands."""

import sys

from .apps.cli import main

sys.exit(main())
