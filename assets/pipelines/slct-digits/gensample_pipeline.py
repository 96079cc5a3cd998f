"""Generic diffusers loading of this LatentConsistencyPipeline folder (written by gensample):

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="gensample_pipeline", trust_remote_code=True)

No model code: this imports the pipeline class and the component modules that model_index.json names from
the installed gensample package, so the pipeline you get is gensample's own class.
"""
import gensample.models.latent_normalizer
import gensample.models.nsln
import gensample.schedulers.scheduling_consistency
from gensample.pipelines.pipeline_latent_consistency import LatentConsistencyPipeline as LoadedPipeline


def __getattr__(name):  # the class by its own name, for a model_index.json _class_name [file, class]
    if name == LoadedPipeline.__name__:
        return LoadedPipeline
    raise AttributeError(name)
