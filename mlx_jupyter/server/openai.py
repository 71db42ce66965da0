"""OpenAI-compatible API: /mlx/v1/models, /mlx/v1/chat/completions, /mlx/v1/completions."""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from mlx_jupyter.engine.errors import ModelNotFoundError
from mlx_jupyter.engine.field_checks import MAX_TOP_LOGPROBS
from mlx_jupyter.engine.models import ModelSpec
from mlx_jupyter.engine.request import SAME_DEFAULT, field_specs
from mlx_jupyter.server.base import APIError, MLXHandler
from mlx_jupyter.server.handlers import without_nulls
from mlx_jupyter.server.streaming import GenerationHandler
from mlx_jupyter.server.wire import ChatWire, CompletionWire, OpenAIWire

# OpenAI fields we accept and ignore, because they do not change a local answer.
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
# Fields of the request itself rather than of the answer's generation.
OWN_FIELDS = {"stream", "stream_options", "n"}


def engine_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The engine request's fields an OpenAI body carries, by ``GenerationRequest``'s own mapping."""
    fields: dict[str, Any] = {}
    for name, spec in field_specs().items():
        value = next((body[key] for key in spec.openai if key in body), None)
        if value is None and spec.openai_default is not SAME_DEFAULT:
            value = spec.openai_default
        if value is not None:
            fields[name] = value
    if fields.get("model") == "":  # OpenAI clients may send an empty model: the server's default
        del fields["model"]
    return fields


def carried_fields() -> set[str]:
    """Every OpenAI field the request mapping reads."""
    return {key for spec in field_specs().values() for key in spec.openai}


def _message_text(i: int, content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which only text is supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "invalid_request")


class OpenAIHandler(GenerationHandler):
    """One completion endpoint; subclasses say where the prompt is and which wire they write."""

    prompt_field = ""  # "messages" or "prompt"
    wire: type[OpenAIWire] = OpenAIWire

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The engine request's fields other than the prompt."""
        return engine_fields(body)

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """An OpenAI completion, whole or streamed as ``data:`` chunks ending in ``[DONE]``."""
        body = without_nulls(self.json_body())
        unknown = sorted(set(body) - carried_fields() - {self.prompt_field} - IGNORED - OWN_FIELDS)
        if unknown:
            raise APIError(400, f"unsupported fields: {', '.join(unknown)}", "unsupported_parameter", param=unknown[0])
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_parameter", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "invalid_request", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "invalid_request", param="stream_options")
        request = self.fields(body) | self.prompt(body)
        self.model = request.get("model") or self.manager.default_model
        await self.answer(request, stream, self.wire(self.model, stream, bool(options.get("include_usage"))))


class ChatCompletionsHandler(OpenAIHandler):
    endpoint = "v1/chat/completions"
    prompt_field = "messages"
    wire = ChatWire

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "invalid_request", param="messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", "invalid_request", param="messages")
            role = "system" if m.get("role") == "developer" else m.get("role")
            out.append({"role": role, "content": _message_text(i, m.get("content"))})
        return {"messages": out}


class CompletionsHandler(OpenAIHandler):
    endpoint = "v1/completions"
    prompt_field = "prompt"
    wire = CompletionWire

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            message = "'prompt' must be a non-empty string (one prompt per request)"
            raise APIError(400, message, "invalid_request", param="prompt")
        return {"prompt": prompt}

    def fields(self, body: dict[str, Any]) -> dict[str, Any]:
        # The legacy API's logprobs is a count: that many alternatives with each token's log probability.
        count = body.get("logprobs")
        if count is None or isinstance(count, bool):
            return engine_fields(body)
        if not isinstance(count, int) or not 0 <= count <= MAX_TOP_LOGPROBS:
            message = f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token)"
            raise APIError(400, message, "invalid_request", param="logprobs")
        rest = {key: value for key, value in body.items() if key != "logprobs"}
        return engine_fields(rest) | {"logprobs": True, "top_logprobs": count}


def _model(spec: ModelSpec) -> dict[str, Any]:
    return {"id": spec.id, "object": "model", "created": 0, "owned_by": spec.source}


class ModelsHandler(MLXHandler):
    endpoint = "v1/models"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Loadable models, in OpenAI's list shape."""
        specs = await self.call(self.manager.resolver.available, status=True)
        self.write_json({"object": "list", "data": [_model(s) for s in specs]})


class ModelHandler(MLXHandler):
    endpoint = "v1/models/{id}"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self, model_id: str) -> None:
        """One loadable model (the openai SDK's ``models.retrieve``); 404 for an id no model has."""
        specs = await self.call(self.manager.resolver.available, status=True)
        for spec in specs:
            if spec.id == model_id:
                self.write_json(_model(spec))
                return
        error = ModelNotFoundError(f"unknown model {model_id!r}: GET mlx/v1/models lists them", model=model_id)
        raise APIError.from_engine(error)


def routes() -> list[tuple[str, type[MLXHandler]]]:
    return [
        (r"/mlx/v1/models", ModelsHandler),
        (r"/mlx/v1/models/(.+)", ModelHandler),
        (r"/mlx/v1/chat/completions", ChatCompletionsHandler),
        (r"/mlx/v1/completions", CompletionsHandler),
    ]
