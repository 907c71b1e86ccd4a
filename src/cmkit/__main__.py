"""``python -m cmkit`` (also what ``torchrun -m cmkit train ...`` runs)."""

import sys

from .cli.main import main

sys.exit(main())
