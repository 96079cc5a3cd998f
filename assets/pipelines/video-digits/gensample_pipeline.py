"""Generic diffusers loading of this MotionGuidedVideoPipeline folder (written by gensample):

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="gensample_pipeline", trust_remote_code=True)

No model code: this imports the pipeline class and the component modules that model_index.json names from
the installed gensample package, so the pipeline you get is gensample's own class.
"""
from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline as LoadedPipeline
