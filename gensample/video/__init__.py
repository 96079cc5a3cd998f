"""Video: moving-digits I/O (io.py), motion metrics (motion_metrics.py), a tiny AnimateDiff-style UNet
(tiny_model.py), motion-consistency guidance (guidance.py) and initial-noise methods (init_noise.py).

Import the submodules directly (``from gensample.video.io import load_video``); this file imports nothing so that
each stays usable on its own.
"""
