"""The alignment operators, registered as ``torch.library`` custom ops."""

from .max_align import max_align
from .scan_align import scan_align

__all__ = ["max_align", "scan_align"]
