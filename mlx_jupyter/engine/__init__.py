"""Model serving core: worker processes, leases, the idle reaper and the lock checker."""

from mlx_jupyter.engine.errors import MLXError
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.settings import EngineSettings
from mlx_jupyter.engine.types import GenerationChunk, GenerationResult, ModelStatus

__all__ = ["EngineSettings", "GenerationChunk", "GenerationResult", "MLXError", "ModelStatus", "WorkerManager"]
