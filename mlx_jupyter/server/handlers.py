"""Native REST API: /mlx/api/health, models, load, unload, generate, events, openapi.json."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from mlx_jupyter import sse
from mlx_jupyter.server.base import APIError, MLXHandler
from mlx_jupyter.server.streaming import GenerationHandler
from mlx_jupyter.server.wire import NativeWire

EVENTS_PING_S = 15.0


def model_field(body: dict[str, Any]) -> str:
    """The model a load or unload names."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' must be a model id string: see GET mlx/api/models/available", "invalid_request")
    return model


def without_nulls(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of a request body that have a value: ``null`` means absent, as in OpenAI's API."""
    return {name: value for name, value in body.items() if value is not None}


class HealthHandler(MLXHandler):
    endpoint = "api/health"
    _track_activity = False  # polling must not keep an idle server alive

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Server health: ``ok`` or ``degraded``, version, models loaded."""
        self.write_json(await self.call(self.manager.health, status=True))


class ModelsHandler(MLXHandler):
    endpoint = "api/models"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Resident models with their state, leases and idle deadline."""
        statuses = await self.call(self.manager.status, status=True)
        self.write_json({"server_time": time.time(), "models": [s.to_dict() for s in statuses]})


class AvailableModelsHandler(MLXHandler):
    endpoint = "api/models/available"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Loadable models: built-in, model_dirs and the Hugging Face cache."""
        specs = await self.call(self.manager.resolver.available, status=True)
        self.write_json([s.to_dict() for s in specs])


class LoadHandler(MLXHandler):
    endpoint = "api/models/load"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Load a model (or find it loaded) and answer its status once ready."""
        body = self.json_body()
        self.model = model_field(body)
        status = await self.call(self.manager.load, self.model, body.get("keep_alive"))
        self.write_json(status.to_dict())


class UnloadHandler(MLXHandler):
    endpoint = "api/models/unload"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Unload a model once its in-flight requests have drained."""
        self.model = model_field(self.json_body())
        status = await self.call(self.manager.unload, self.model)
        self.write_json(status.to_dict())


class GenerateHandler(GenerationHandler):
    endpoint = "api/generate"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Generate from a prompt or messages: JSON, or Server-Sent Events with ``stream``."""
        request = without_nulls(self.json_body())
        stream = request.pop("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "invalid_request", param="stream")
        self.model = request.get("model") or self.manager.default_model
        await self.answer(request, stream, NativeWire(self.model))


class EventsHandler(MLXHandler):
    endpoint = "api/events"
    endless = True
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Server-Sent Events of model state changes, after a snapshot of every model."""
        hub = self.settings["mlx_events"]
        queue = hub.subscribe()
        try:
            statuses = await self.call(self.manager.status, status=True)
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            snapshot = {"server_time": time.time(), "models": [s.to_dict() for s in statuses]}
            self.write(sse.encode(snapshot, "snapshot"))
            await self.flush()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), EVENTS_PING_S)
                except asyncio.TimeoutError:
                    self.write(sse.comment("ping"))  # finds clients that left without a FIN
                else:
                    if event is None:
                        break
                    self.write(sse.encode(event, event["type"]))
                await self.flush()
        except StreamClosedError:
            return
        finally:
            hub.unsubscribe(queue)
        self.finish()


class OpenAPIHandler(MLXHandler):
    endpoint = "api/openapi.json"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The OpenAPI 3 description of both APIs."""
        self.finish(self.settings["mlx_openapi"])


def routes() -> list[tuple[str, type[MLXHandler]]]:
    return [
        (r"/mlx/api/health", HealthHandler),
        (r"/mlx/api/models", ModelsHandler),
        (r"/mlx/api/models/available", AvailableModelsHandler),
        (r"/mlx/api/models/load", LoadHandler),
        (r"/mlx/api/models/unload", UnloadHandler),
        (r"/mlx/api/generate", GenerateHandler),
        (r"/mlx/api/events", EventsHandler),
        (r"/mlx/api/openapi.json", OpenAPIHandler),
    ]
