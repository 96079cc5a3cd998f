"""diffusers pipelines of gensample, installed as ``gensample.pipelines``."""
from .pipeline_consistency import ConsistencyPipeline
from .pipeline_ctm import CTMPipeline
from .pipeline_edm import EDMPipeline
from .pipeline_latent_consistency import LatentConsistencyPipeline
from .pipeline_motion_guided_video import MotionGuidedVideoPipeline

__all__ = ["CTMPipeline", "ConsistencyPipeline", "EDMPipeline", "LatentConsistencyPipeline",
           "MotionGuidedVideoPipeline"]
