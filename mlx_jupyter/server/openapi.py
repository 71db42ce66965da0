"""The OpenAPI document of both APIs: the shipped file, with every request field from GenerationRequest."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from mlx_jupyter.engine.request import SAME_DEFAULT, field_specs, json_schema

# Request bodies whose generation fields come from GenerationRequest (native) or its OpenAI mapping.
NATIVE_REQUEST = "GenerateRequest"
OPENAI_REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


def openapi_document() -> str:
    """The document served at ``mlx/api/openapi.json`` (built once, at server start)."""
    document = json.loads(files("mlx_jupyter.server").joinpath("openapi.json").read_text(encoding="utf-8"))
    schemas = document["components"]["schemas"]
    schemas[NATIVE_REQUEST]["properties"] = native_properties() | schemas[NATIVE_REQUEST]["properties"]
    for name in OPENAI_REQUESTS:
        schemas[name]["properties"] = openai_properties() | schemas[name]["properties"]
    return json.dumps(document, indent=2)


def native_properties() -> dict[str, Any]:
    """``POST mlx/api/generate``'s fields: every GenerationRequest field, as it declares it."""
    return {name: json_schema(name) for name in field_specs()}


def openai_properties() -> dict[str, Any]:
    """The OpenAI fields that carry GenerationRequest's fields (``null`` means the default)."""
    properties: dict[str, Any] = {}
    for name, spec in field_specs().items():
        for key in spec.openai:
            schema = json_schema(name) | {"nullable": True}
            if spec.openai_default is not SAME_DEFAULT:
                schema["default"] = spec.openai_default
            properties[key] = schema
    return properties
