from .base import TrainingMethod
from .ctm import CTMTraining
from .ect import EasyConsistencyTuning
from .edm import EDMTraining
from .ict import ImprovedConsistencyTraining
from .lct import LatentConsistencyTraining

__all__ = ["TrainingMethod", "ImprovedConsistencyTraining", "EasyConsistencyTuning", "EDMTraining", "CTMTraining", "LatentConsistencyTraining"]
