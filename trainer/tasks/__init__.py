"""Training tasks, registered by lazy "module:Class" names so that importing the registry
imports no model code. A config's `task` is a registered name or any "module:Class".

    image_kd    DistilData2Vec2: Data2Vec2 ViT teacher -> its first blocks (trainer/tasks/image_kd.py)
    text_kd     F-DistilBERT: BERT teacher -> its first layers (trainer/tasks/text_kd.py)
    multimodal  S-SMKE: image + text towers, shared block, BEiTv2 teacher (trainer/tasks/multimodal.py)
"""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "image_kd": "trainer.tasks.image_kd:ImageKDTask",
    "text_kd": "trainer.tasks.text_kd:TextKDTask",
    "multimodal": "trainer.tasks.multimodal:MultimodalTask",
}


def task_spec(name: str) -> str:
    """The "module:Class" spec of a registered name (or the name itself if it is a spec)."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        return name
    raise KeyError(name)


def get_task(name: str) -> type:
    """The Task class for a registered name or a "module:Class" spec. Raises KeyError for an
    unknown name and ImportError/AttributeError when the spec cannot be imported."""
    mod_name, _, cls_name = task_spec(name).partition(":")
    return getattr(importlib.import_module(mod_name), cls_name)
