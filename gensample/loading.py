"""Load any gensample pipeline folder by the class name its model_index.json records."""
from __future__ import annotations

import json
from pathlib import Path


def pipeline_classes() -> dict:
    from gensample import pipelines

    return {name: getattr(pipelines, name) for name in pipelines.__all__}


def load_pipeline(path: str | Path, **kwargs):
    """``ConsistencyPipeline.from_pretrained(path)`` or whichever gensample pipeline class saved ``path``."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved pipeline (no model_index.json). Point at the folder save_pretrained wrote, "
            "e.g. runs/ict/pipeline."
        )
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index} is corrupt or not a diffusers model index ({e}).") from e
    classes = pipeline_classes()
    if class_name not in classes:
        raise ValueError(f"{path} holds a {class_name!r}, not a gensample pipeline ({sorted(classes)}).")
    return classes[class_name].from_pretrained(path, **kwargs)
