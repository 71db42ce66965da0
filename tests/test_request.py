"""One request type: the magics' options and the OpenAI mapping are made from GenerationRequest's fields."""

from __future__ import annotations

import pytest

from mlx_jupyter.engine.errors import InvalidRequestError
from mlx_jupyter.engine.field_checks import Limits
from mlx_jupyter.engine.request import GenerationRequest, field_default, field_specs
from mlx_jupyter.server.openai import engine_fields


def test_every_request_field_with_an_option_is_a_cell_magic_option_with_its_help(shell):
    parser = shell.magics_manager.registry["MLXMagics"].mlx_cell.parser
    actions = {action.dest: action for action in parser._actions}
    for name, spec in field_specs().items():
        if spec.option:
            assert set(actions[name].option_strings) == set(spec.option), name
            assert actions[name].help.startswith(spec.help), name


def test_the_openai_mapping_reads_every_openai_name_of_a_field_and_its_openai_default():
    for name, spec in field_specs().items():
        for key in spec.openai:
            assert engine_fields({key: "value"})[name] == "value", (name, key)
    assert engine_fields({})["temperature"] == 1.0, "OpenAI's default temperature is 1, not greedy"
    assert engine_fields({"max_tokens": 5, "max_completion_tokens": 7})["max_tokens"] == 7


def test_absent_and_null_fields_take_their_defaults_and_unknown_fields_are_refused():
    request = GenerationRequest.parse({"prompt": "hi", "seed": None})
    for name in ("max_tokens", "temperature", "top_p", "seed", "stop"):
        assert getattr(request, name) == field_default(name), name
    assert GenerationRequest.parse({"prompt": "hi"}, Limits(max_tokens=100)).max_tokens == 100, "within the bound"
    with pytest.raises(InvalidRequestError, match=r"unknown fields \['max_length'\]") as info:
        GenerationRequest.parse({"prompt": "hi", "max_length": 3})
    assert info.value.param == "max_length"


BAD_TOKEN_IDS = {
    "superscript_digit": "²",
    "arabic_digit": "٣",
    "eleven_digits": "1" * 11,
    "past_int32_text": str(2**31),
    "past_int32": 2**31,
    "negative": -1,
    "5001_digits": 10**5000,
    "fraction": "1.5",
    "space": " 7",
    "bool": True,
}


@pytest.mark.parametrize("key", BAD_TOKEN_IDS.values(), ids=BAD_TOKEN_IDS.keys())
def test_a_logit_bias_key_that_is_no_token_id_is_refused_by_name(key):
    with pytest.raises(InvalidRequestError, match="logit_bias") as raised:
        GenerationRequest.parse({"prompt": "hi", "logit_bias": {key: 1}})
    assert raised.value.param == "logit_bias"
    assert GenerationRequest.parse({"prompt": "hi", "logit_bias": {"7": 1, 8: -1}}).logit_bias == {7: 1.0, 8: -1.0}
