"""diffusers pipelines of gensample, installed as ``gensample.pipelines``.

A saved folder loads with ``XPipeline.from_pretrained(folder)``, ``gensample.load_pipeline(folder)`` or diffusers'
``DiffusionPipeline.from_pretrained(folder, custom_pipeline="gensample_pipeline", trust_remote_code=True)``
(:mod:`gensample.pipelines.pipeline_utils`)."""
from .pipeline_consistency import ConsistencyPipeline
from .pipeline_ctm import CTMPipeline
from .pipeline_edm import EDMPipeline
from .pipeline_latent_consistency import LatentConsistencyPipeline
from .pipeline_motion_guided_video import MotionGuidedVideoPipeline
from .pipeline_nct import NCTPipeline
from .pipeline_scott import SCottPipeline

__all__ = ["CTMPipeline", "ConsistencyPipeline", "EDMPipeline", "LatentConsistencyPipeline",
           "MotionGuidedVideoPipeline", "NCTPipeline", "SCottPipeline"]
