"""diffusers pipelines of gensample, installed as ``gensample.pipelines``."""
from .pipeline_consistency import ConsistencyPipeline
from .pipeline_ctm import CTMPipeline
from .pipeline_edm import EDMPipeline

__all__ = ["ConsistencyPipeline", "CTMPipeline", "EDMPipeline"]
