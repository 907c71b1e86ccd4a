"""cmkit: Consistency Models (CD, CT, iCT, ECT), zero-shot editing and the Consistency Decoder."""
from __future__ import annotations

__version__ = "0.1.0"
