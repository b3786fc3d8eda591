"""Exceptions raised by ttaperso.

Every error names the bad value and what was expected. All of them derive from
:class:`TTAPersoError`; the input/config ones also derive from :class:`ValueError` so
callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class TTAPersoError(Exception):
    """Base class of every error raised on purpose by ttaperso."""


class InputError(TTAPersoError, ValueError):
    """Frames, subject ids or other call arguments are malformed."""


class ConfigError(TTAPersoError, ValueError):
    """A strategy name, config key or config value is invalid."""


class ModelInterfaceError(TTAPersoError, ValueError):
    """A model cannot be used as asked (no head, no normalization layer, ...)."""


class StateFileError(TTAPersoError, ValueError):
    """A saved subject state is corrupt, foreign or incompatible with this Personalizer."""


class StaleStateError(StateFileError):
    """A write was refused because the stored state is newer than the one the writer holds.

    Raised by a store's compare-and-set write (``expected_version``): another writer saved
    this subject since this one last read or wrote it; nothing was overwritten.
    """
