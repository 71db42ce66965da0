"""Native REST API: /mlx/api/health, models, load, unload, generate, events, openapi.json."""

from __future__ import annotations

import asyncio
import time
from importlib.resources import files
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from mlx_jupyter import sse
from mlx_jupyter.engine.errors import MLXError
from mlx_jupyter.engine.types import GenerationChunk
from mlx_jupyter.server.base import APIError, MLXHandler, error_body
from mlx_jupyter.server.metrics import TOKENS, TTFT
from mlx_jupyter.server.streaming import ChunkBridge

GENERATE_FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "keep_alive")
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


class StreamingMixin:
    """Server-Sent Events from an engine stream; a client that leaves cancels it."""

    bridge: ChunkBridge | None = None

    async def start_stream(self, request: dict[str, Any]) -> ChunkBridge:
        try:  # the engine checks every field, the prompt's size included, before any work
            chunks = self.manager.stream_generate(**request)  # type: ignore[attr-defined]
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc
        try:
            thread = await self.admit()  # type: ignore[attr-defined]
        except BaseException:
            chunks.close()  # type: ignore[attr-defined]
            raise
        self.bridge = ChunkBridge(chunks, thread)
        return self.bridge

    async def first_and_rest(self, bridge: ChunkBridge) -> tuple[GenerationChunk, Any]:
        """The first chunk (engine errors before it are still plain HTTP errors), and the rest."""
        chunks = aiter(bridge)
        try:
            first = await anext(chunks)
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc
        return first, chunks

    async def collect(self, first: GenerationChunk, rest: Any) -> tuple[str, GenerationChunk]:
        """The whole text and the final chunk; an engine error mid-answer keeps its status."""
        texts, final = [first.text], first
        try:
            async for chunk in rest:
                texts.append(chunk.text)
                final = chunk
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc
        if final.finish_reason is None:  # cancelled: the client left, and nothing is answered
            raise RuntimeError("the answer ended without its final chunk")
        return "".join(texts), final

    def begin_sse(self) -> None:
        self.set_header("Content-Type", "text/event-stream")  # type: ignore[attr-defined]
        self.set_header("Cache-Control", "no-cache")  # type: ignore[attr-defined]
        self.set_header("X-Accel-Buffering", "no")  # type: ignore[attr-defined]

    async def send_event(self, data: Any, event: str | None = None) -> None:
        self.write(sse.encode(data, event))  # type: ignore[attr-defined]
        await self.flush()  # type: ignore[attr-defined]

    def on_connection_close(self) -> None:
        if self.bridge is not None:
            self.bridge.cancel()
        super().on_connection_close()  # type: ignore[misc]

    def record_usage(self, model: str, final: GenerationChunk) -> None:
        if final.usage:
            TOKENS.labels(model).inc(final.usage.get("completion_tokens", 0))
        if final.timings and final.timings.get("ttft_s") is not None:
            TTFT.labels(model).observe(final.timings["ttft_s"])


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


class GenerateHandler(StreamingMixin, MLXHandler):
    endpoint = "api/generate"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Generate from a prompt or messages: JSON, or Server-Sent Events with ``stream``."""
        body = without_nulls(self.json_body())
        unknown = sorted(set(body) - set(GENERATE_FIELDS) - {"stream"})
        if unknown:
            accepted = ", ".join([*GENERATE_FIELDS, "stream"])
            raise APIError(400, f"unknown fields {unknown}: accepted are {accepted}", "invalid_request")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "invalid_request")
        request = {k: body[k] for k in GENERATE_FIELDS if k in body}
        self.model = model = request.get("model") or self.manager.default_model
        first, rest = await self.first_and_rest(await self.start_stream(request))
        if not stream:
            text, final = await self.collect(first, rest)
            self.record_usage(model, final)
            self.write_json(
                {
                    "model": model,
                    "text": text,
                    "finish_reason": final.finish_reason,
                    "usage": final.usage,
                    "timings": final.timings,
                }
            )
            return
        self.begin_sse()
        chunk = first
        try:
            while chunk.finish_reason is None:
                await self.send_event({"text": chunk.text})
                chunk = await anext(rest)
            self.record_usage(model, chunk)
            await self.send_event(chunk.final_event(model))
        except StreamClosedError:
            self.bridge.cancel()
            return
        except MLXError as exc:
            await self.send_event(error_body(APIError.from_engine(exc)), event="error")
        self.finish()


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


def openapi_document() -> str:
    """The OpenAPI document shipped in the package (read once, at server start)."""
    return files("mlx_jupyter.server").joinpath("openapi.json").read_text(encoding="utf-8")


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
