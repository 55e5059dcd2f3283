"""``python -m memgpt demo`` runs the main demonstration; ``--help`` lists the commands."""

import sys

from .cli import main

sys.exit(main())
