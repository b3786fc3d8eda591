"""The Personalizer: one frozen model, one small adapted state per subject.

Split by concern: :mod:`.personalizer` (the class: predict, predict_many, reset, and the
entry points below), :mod:`.prediction` (what ``predict`` returns), :mod:`.batching`
(several subjects in one forward), :mod:`.persistence` (state files: metadata and the
checks on load), :mod:`.clinic` (neutral-baseline calibration) and :mod:`.trail` (the
audit trail of a Personalizer's events).
"""

from __future__ import annotations

from .personalizer import Personalizer
from .prediction import Prediction

__all__ = ["Personalizer", "Prediction"]
