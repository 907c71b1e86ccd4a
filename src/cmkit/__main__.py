"""``python -m cmkit`` (also what ``torchrun -m cmkit train ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
