"""Work-arounds for library versions piflow meets in the field (each says which versions and why)."""
from __future__ import annotations


def allow_processor_without_video() -> bool:
    """transformers ≥ 5 builds, saves and loads `Qwen2VLProcessor` with a video processor that needs torchvision,
    so Qwen-Image-Edit pipelines cannot load without it (transformers#43986). Where torchvision is missing, let
    the processor do without (the edit pipelines never pass videos): drops "video_processor" from its parts,
    process-wide, idempotent. Returns True when active."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return False
    if not getattr(Qwen2VLProcessor, "_piflow_without_video", False):
        parts = Qwen2VLProcessor.get_attributes.__func__

        def get_attributes(cls):
            return [name for name in parts(cls) if name != "video_processor"]

        Qwen2VLProcessor.get_attributes = classmethod(get_attributes)
        Qwen2VLProcessor._piflow_without_video = True
    return True
