from .base import TrainingMethod
from .ict import ImprovedConsistencyTraining

__all__ = ["TrainingMethod", "ImprovedConsistencyTraining"]
