"""diffusers pipelines of gensample, installed as ``gensample.pipelines``."""
from .pipeline_consistency import ConsistencyPipeline

__all__ = ["ConsistencyPipeline"]
