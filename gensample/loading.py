"""Load any gensample pipeline folder by the class name its model_index.json records, and make folders written
before generic loading existed loadable by diffusers' ``DiffusionPipeline.from_pretrained`` too.

Generic loading of a folder a gensample pipeline saved (diffusers' mechanism for pipelines defined outside diffusers;
the folder's ``gensample_pipeline.py`` only imports gensample's class, see :mod:`gensample.pipelines.pipeline_utils`)::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="gensample_pipeline", trust_remote_code=True)
"""
from __future__ import annotations

import json
from pathlib import Path


def pipeline_classes() -> dict:
    from gensample import pipelines

    return {name: getattr(pipelines, name) for name in pipelines.__all__}


def _index(path: Path) -> tuple[dict, str]:
    """model_index.json of ``path`` and the pipeline class name it records (a string, or diffusers' custom-code form
    ``[module, class]``)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved pipeline (no model_index.json). Point at the folder save_pretrained wrote, "
            "e.g. runs/ict/pipeline."
        )
    try:
        config = json.loads(index.read_text())
        class_name = config["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index} is corrupt or not a diffusers model index ({e}).") from e
    if isinstance(class_name, list) and len(class_name) == 2:
        class_name = class_name[1]
    return config, class_name


def _pipeline_class(path: Path, class_name) -> type:
    classes = pipeline_classes()
    if class_name not in classes:
        raise ValueError(f"{path} holds a {class_name!r}, not a gensample pipeline ({sorted(classes)}).")
    return classes[class_name]


def load_pipeline(path: str | Path, **kwargs):
    """``ConsistencyPipeline.from_pretrained(path)`` or whichever gensample pipeline class saved ``path``."""
    path = Path(path)
    _, class_name = _index(path)
    return _pipeline_class(path, class_name).from_pretrained(path, **kwargs)


def enable_generic_loading(path: str | Path) -> Path:
    """Write ``gensample_pipeline.py`` into a pipeline folder saved before gensample wrote it (nothing else is
    touched), so that ``DiffusionPipeline.from_pretrained(path, custom_pipeline="gensample_pipeline",
    trust_remote_code=True)`` loads it. Returns the file's path."""
    from gensample.pipelines.pipeline_utils import write_loader

    path = Path(path)
    config, class_name = _index(path)
    written = write_loader(path, _pipeline_class(path, class_name), config)
    if written is None:  # pragma: no cover - gensample's own classes are importable
        raise ValueError(f"{class_name} cannot be imported by module path.")
    return written
