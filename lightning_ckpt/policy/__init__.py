"""Pure decisions: when to save, what to keep. No I/O, no Lightning."""
from .triggers import SaveTrigger

__all__ = ["SaveTrigger"]
