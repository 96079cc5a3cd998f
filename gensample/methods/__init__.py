from .base import TrainingMethod
from .edm import EDMTraining
from .ict import ImprovedConsistencyTraining

__all__ = ["TrainingMethod", "ImprovedConsistencyTraining", "EDMTraining"]
