"""The kernel's model client: a Jupyter server's REST API, or a WorkerManager hosted in the kernel."""

from mlx_jupyter.kernel.client.base import MLXClient
from mlx_jupyter.kernel.client.discovery import (
    ClientCache,
    Discovery,
    discover,
    runtime_file_server,
    server_candidates,
)
from mlx_jupyter.kernel.client.errors import (
    AuthError,
    ClientError,
    ServerUnreachableError,
    UnknownModelError,
    error_from_body,
    error_from_engine,
)
from mlx_jupyter.kernel.client.local import ENGINE_DEFAULT_MODEL, LocalClient
from mlx_jupyter.kernel.client.server import HEALTH_TIMEOUT_S, ServerClient
from mlx_jupyter.kernel.client.shared import get_client, openai_api_key, openai_base_url, reset_client

__all__ = [
    "ENGINE_DEFAULT_MODEL",
    "HEALTH_TIMEOUT_S",
    "AuthError",
    "ClientCache",
    "ClientError",
    "Discovery",
    "LocalClient",
    "MLXClient",
    "ServerClient",
    "ServerUnreachableError",
    "UnknownModelError",
    "discover",
    "error_from_body",
    "error_from_engine",
    "get_client",
    "openai_api_key",
    "openai_base_url",
    "reset_client",
    "runtime_file_server",
    "server_candidates",
]
