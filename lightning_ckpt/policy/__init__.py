"""Pure decisions: when to save, what to keep. No I/O, no Lightning."""
from .adaptive import AdaptiveInterval, overhead_interval, young_daly_interval
from .conditions import Monitor, moved_enough
from .retention import AnyOf, KeepBest, KeepEveryNSteps, KeepLast, KeepTagged, Record, RetentionRules, plan_retention
from .triggers import SaveTrigger

__all__ = [
    "AdaptiveInterval", "AnyOf", "KeepBest", "KeepEveryNSteps", "KeepLast", "KeepTagged", "Monitor", "Record",
    "RetentionRules", "SaveTrigger", "moved_enough", "overhead_interval", "plan_retention", "young_daly_interval",
]
