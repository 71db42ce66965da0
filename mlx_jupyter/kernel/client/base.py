"""What the magics and widgets need from a model host, whichever it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any


class MLXClient(ABC):
    """A model host; every method may raise ClientError.

    ``host`` says in words who serves this kernel. Methods return plain dicts shaped like
    the REST API's answers, whichever host is behind them.
    """

    host: str

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """As ``GET mlx/api/health``."""

    @abstractmethod
    def models(self) -> dict[str, Any]:
        """As ``GET mlx/api/models``: ``{"server_time", "models": [status dicts]}``."""

    @abstractmethod
    def available(self) -> list[dict[str, Any]]:
        """As ``GET mlx/api/models/available``."""

    @abstractmethod
    def load(self, model: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        """Load ``model`` (or find it loaded); its status once ready."""

    @abstractmethod
    def unload(self, model: str) -> dict[str, Any]:
        """Unload ``model`` once its in-flight requests have drained; its last status."""

    @abstractmethod
    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream an answer as ``{"text"}`` dicts, the last with ``finish_reason``, ``usage``, ``timings``.

        ``request`` has the fields of ``POST mlx/api/generate`` (``stream`` is implied).
        Closing the iterator early cancels the generation at its source.
        """

    @abstractmethod
    def close(self) -> None:
        """Release what the client holds (a local engine stops its workers)."""

    @property
    def is_local(self) -> bool:
        return False
