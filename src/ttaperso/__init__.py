"""ttaperso: per-subject test-time personalization of frozen facial-expression models.

p = Personalizer(load_model("fer-mini-xception"))      # strategy DEFAULT_STRATEGY
out = p.predict(frames, subject="patient-017")           # uint8 face crops, or prepared
for result in run_video("interview.mp4", subject="patient-017"): ...   # or `ttaperso run`
"""

from __future__ import annotations

from ._version import __version__
from .audit import AuditLog
from .config import StrategyConfig
from .errors import (
    ConfigError,
    InputError,
    ModelInterfaceError,
    StaleStateError,
    StateFileError,
    TTAPersoError,
)
from .gates import EntropyGate, Gate, PrototypeGate, TemporalGate
from .guards import CollapseGuard
from .model import FERModel
from .models import list_models, load_model
from .personalizer import Personalizer, Prediction
from .personalizer.personalizer import DEFAULT_STRATEGY
from .source_data import SourceData
from .stores import FolderStore, StateStore
from .strategies import (
    ClipAuttConfig,
    EataConfig,
    FisherConfig,
    NormConfig,
    SarConfig,
    ShotConfig,
    SourceConfig,
    T3aConfig,
    TentConfig,
    TtaCapConfig,
    list_strategies,
    register_strategy,
)
from .video import Session, run_video

__all__ = [
    "__version__",
    "DEFAULT_STRATEGY",
    "Personalizer",
    "Session",
    "run_video",
    "Prediction",
    "FERModel",
    "SourceData",
    "list_strategies",
    "register_strategy",
    "list_models",
    "load_model",
    "StrategyConfig",
    "SourceConfig",
    "NormConfig",
    "TentConfig",
    "SarConfig",
    "EataConfig",
    "FisherConfig",
    "T3aConfig",
    "ShotConfig",
    "TtaCapConfig",
    "ClipAuttConfig",
    "Gate",
    "TemporalGate",
    "EntropyGate",
    "CollapseGuard",
    "AuditLog",
    "PrototypeGate",
    "FolderStore",
    "StateStore",
    "TTAPersoError",
    "InputError",
    "ConfigError",
    "ModelInterfaceError",
    "StateFileError",
    "StaleStateError",
]


def __getattr__(name: str) -> object:
    # Names documented before 0.2 (SarConfig, TtaCapConfig) warn and resolve.
    from . import strategies

    if name in strategies.DEPRECATED_NAMES:
        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
