"""ttaperso: per-subject test-time personalization of frozen facial-expression models.

p = Personalizer(load_model("fer-mini-xception"), strategy="tent")
out = p.predict(frames, subject="patient-017")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .audit import AuditLog
from .config import StrategyConfig
from .errors import (
    ConfigError,
    InputError,
    ModelInterfaceError,
    StateFileError,
    TTAPersoError,
)
from .gates import EntropyGate, Gate, PrototypeGate, TemporalGate
from .guards import CollapseGuard
from .model import FERModel
from .models import list_models, load_model
from .personalizer import Personalizer, Prediction
from .source_data import SourceData
from .store import FolderStore, StateStore
from .strategies import (
    NormConfig,
    SARConfig,
    SourceConfig,
    TentConfig,
    list_strategies,
    register_strategy,
)

__all__ = [
    "Personalizer",
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
    "SARConfig",
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
]
