"""OpenAI-compatible API: /mlx/v1/models, /mlx/v1/chat/completions, /mlx/v1/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from mlx_jupyter import sse
from mlx_jupyter.engine.errors import MLXError
from mlx_jupyter.server.base import APIError, MLXHandler, error_body
from mlx_jupyter.server.handlers import StreamingMixin, without_nulls

DEFAULT_MAX_TOKENS = 256
# OpenAI fields we accept and ignore, because they do not change a local answer.
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "frequency_penalty", "presence_penalty"}


def _message_text(i: int, content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which only text is supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "invalid_request")


class OpenAIHandler(StreamingMixin, MLXHandler):
    """One completion endpoint; subclasses say how the prompt is read and chunks are shaped."""

    kind = ""  # "chat.completion" or "text_completion"
    prompt_fields: tuple[str, ...] = ()

    def engine_request(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(
            set(body)
            - set(self.prompt_fields)
            - IGNORED
            - {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n"}
            - {"stream", "stream_options", "keep_alive"}
        )
        if unknown:
            raise APIError(400, f"unsupported fields: {', '.join(unknown)}", "unsupported_parameter")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_parameter")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        request = {
            "model": body.get("model") or None,
            "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "seed": body.get("seed"),
            "stop": body.get("stop"),
            "keep_alive": body.get("keep_alive"),
        }
        return request | self.prompt(body)

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """An OpenAI completion, whole or streamed as ``data:`` chunks ending in ``[DONE]``."""
        body = without_nulls(self.json_body())
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "invalid_request")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "invalid_request")
        request = self.engine_request(body)
        self.model = model = request["model"] or self.manager.default_model
        first, rest = await self.first_and_rest(await self.start_stream(request))
        head = {"id": f"{'chatcmpl' if self.kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"}
        head |= {"object": self.kind + (".chunk" if stream and self.kind.startswith("chat") else ""), "model": model}
        head["created"] = int(time.time())
        if not stream:
            text, final = await self.collect(first, rest)
            self.record_usage(model, final)
            self.write_json(head | self.whole(text, final.finish_reason) | {"usage": final.usage})
            return
        self.begin_sse()
        chunk, is_first = first, True
        try:
            while True:
                if chunk.text or is_first or chunk.finish_reason:
                    await self.send_event(head | {"choices": [self.choice(chunk.text, chunk.finish_reason, is_first)]})
                    is_first = False
                if chunk.finish_reason is not None:
                    break
                chunk = await anext(rest)
            self.record_usage(model, chunk)
            if options.get("include_usage"):
                await self.send_event(head | {"choices": [], "usage": chunk.usage})
        except StreamClosedError:
            self.bridge.cancel()
            return
        except MLXError as exc:
            await self.send_event(error_body(APIError.from_engine(exc)))
        await self.send_event(sse.DONE)
        self.finish()


class ChatCompletionsHandler(OpenAIHandler):
    endpoint = "v1/chat/completions"
    kind = "chat.completion"
    prompt_fields = ("messages",)

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "invalid_request")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", "invalid_request")
            role = "system" if m.get("role") == "developer" else m.get("role")
            out.append({"role": role, "content": _message_text(i, m.get("content"))})
        return {"messages": out}

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}


class CompletionsHandler(OpenAIHandler):
    endpoint = "v1/completions"
    kind = "text_completion"
    prompt_fields = ("prompt",)

    def prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", "invalid_request")
        return {"prompt": prompt}

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"choices": [self.choice(text, finish_reason, True)]}


class ModelsHandler(MLXHandler):
    endpoint = "v1/models"
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Loadable models, in OpenAI's list shape."""
        specs = await self.call(self.manager.resolver.available, status=True)
        self.write_json(
            {
                "object": "list",
                "data": [{"id": s.id, "object": "model", "created": 0, "owned_by": s.source} for s in specs],
            }
        )


def routes() -> list[tuple[str, type[MLXHandler]]]:
    return [
        (r"/mlx/v1/models", ModelsHandler),
        (r"/mlx/v1/chat/completions", ChatCompletionsHandler),
        (r"/mlx/v1/completions", CompletionsHandler),
    ]
