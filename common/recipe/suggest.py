"""The recipe package's name for :mod:`mksuite.common.suggest` (kept for its importers)."""

from mksuite.common.suggest import SUGGEST_CUTOFF, closest, edit_distance, is_slip_of, suggestion

__all__ = ["SUGGEST_CUTOFF", "closest", "edit_distance", "is_slip_of", "suggestion"]
