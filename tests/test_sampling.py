"""Sampling parameters, penalties, logit bias and log probabilities in real workers, alone and per row of a batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from mlx_jupyter.builtin_models.builder import EOS
from mlx_jupyter.engine.errors import InvalidRequestError
from mlx_jupyter.engine.models import builtin_model_path
from mlx_jupyter.engine.token_logprobs import entry
from mlx_jupyter.engine.token_text import TokenBytes
from mlx_jupyter.engine.worker_decoding import MAX_SAMPLERS, Decoder
from tests.helpers import run_concurrently
from tests.models import PYDOC, TINY

# builtin:tiny's greedy answer to this prompt repeats one token ("hon") for as long as it may:
# any penalty on repeats must change it.
REPEATS = {"prompt": "The Zen of Python", "max_tokens": 24}
PENALTIES = [
    {"repetition_penalty": 2.0},
    {"repetition_penalty": 1.5, "repetition_context_size": 4},
    {"presence_penalty": 2.0},
    {"frequency_penalty": 2.0},
]


def test_each_penalty_changes_a_repetitive_greedy_answer(make_manager):
    manager = make_manager()
    plain = manager.generate(model=TINY, **REPEATS)
    assert len(set(plain.text.split("hon"))) == 1, f"the model should repeat one token: {plain.text!r}"
    answers = {}
    for penalty in PENALTIES:
        answer = manager.generate(model=TINY, **REPEATS, **penalty).text
        assert answer != plain.text, f"{penalty} changed nothing"
        assert answer == manager.generate(model=TINY, **REPEATS, **penalty).text, "a greedy answer is deterministic"
        answers[str(penalty)] = answer
    assert len(set(answers.values())) > 1, answers


def test_the_repetition_penalty_looks_back_as_far_as_its_context_size(make_manager):
    manager = make_manager()
    ask = {"model": PYDOC, "prompt": "The for statement", "max_tokens": 40, "repetition_penalty": 1.3}
    last_token = manager.generate(**ask, repetition_context_size=1).text
    far = manager.generate(**ask, repetition_context_size=64).text
    assert last_token != far


def test_logit_bias_forces_and_bans_tokens(make_manager):
    manager = make_manager()
    plain = manager.generate(model=TINY, **REPEATS, top_logprobs=2)
    first, runner_up = plain.logprobs[0]["top_logprobs"]
    forced = manager.generate(model=TINY, **REPEATS, logit_bias={"70": 100}, logprobs=True)
    assert {e["token"] for e in forced.logprobs} == {forced.logprobs[0]["token"]}, "token 70 every time"
    banned_id = _tokenizer().token_to_id(first["token"].replace(" ", "\u0120"))
    banned = manager.generate(model=TINY, **REPEATS, logit_bias={banned_id: -100}, logprobs=True)
    assert banned.logprobs[0]["token"] == runner_up["token"]
    assert first["token"] not in {e["token"] for e in banned.logprobs}


def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(builtin_model_path("tiny") / "tokenizer.json"))


def test_a_logit_bias_outside_the_vocabulary_is_refused_by_name_and_the_worker_keeps_serving(make_manager):
    manager = make_manager()
    with pytest.raises(InvalidRequestError, match="outside this model's vocabulary of 384") as raised:
        manager.generate(model=TINY, prompt="x", logit_bias={"384": 1.0})
    assert raised.value.param == "logit_bias" and raised.value.value == 384
    assert manager.generate(model=TINY, prompt="x", max_tokens=3).usage["completion_tokens"] == 3


def test_top_k_1_and_min_p_1_sample_only_the_most_likely_token(make_manager):
    manager = make_manager()
    greedy = manager.generate(model=TINY, prompt="Hello", max_tokens=20).text
    for narrow in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": 1_000_000}):
        sampled = manager.generate(model=TINY, prompt="Hello", max_tokens=20, temperature=5.0, **narrow).text
        if "top_k" in narrow and narrow["top_k"] > 1:  # every token is among the top million: wide open
            assert sampled != greedy
        else:
            assert sampled == greedy, narrow


def test_log_probabilities_describe_every_generated_token(make_manager):
    manager = make_manager()
    answer = manager.generate(model=TINY, prompt="Hello", max_tokens=12, top_logprobs=5)
    entries = answer.logprobs
    assert len(entries) == answer.usage["completion_tokens"] == 12
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == answer.text
    for e in entries:
        assert e["logprob"] <= 0 and e["token"] == bytes(e["bytes"]).decode("utf-8", "backslashreplace")
        alternatives = [a["logprob"] for a in e["top_logprobs"]]
        assert len(alternatives) == 5 and alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert e["top_logprobs"][0]["token"] == e["token"] and e["top_logprobs"][0]["logprob"] == e["logprob"]
    assert sum(math.exp(a["logprob"]) for a in entries[0]["top_logprobs"]) <= 1.0 + 1e-5
    only = manager.generate(model=TINY, prompt="Hello", max_tokens=3, logprobs=True).logprobs
    assert [e["top_logprobs"] for e in only] == [[], [], []]
    assert manager.generate(model=TINY, prompt="Hello", max_tokens=3).logprobs is None


def test_the_end_of_sequence_token_has_its_entry_as_it_counts_as_a_completion_token(make_manager):
    manager = make_manager()
    messages = [{"role": "user", "content": "hi"}]
    eos = _tokenizer().token_to_id(EOS)
    answer = manager.generate(model=TINY, messages=messages, max_tokens=3, logprobs=True, logit_bias={eos: 100})
    assert answer.finish_reason == "stop"
    assert answer.logprobs[0]["token"] == EOS
    assert len(answer.logprobs) == answer.usage["completion_tokens"] == 1
    assert answer.text == ""


def test_every_row_of_a_batch_gets_its_own_parameters_and_answers_as_it_would_alone(make_manager):
    manager = make_manager()
    requests = [
        REPEATS,
        *({**REPEATS, **penalty} for penalty in PENALTIES),
        {**REPEATS, "logit_bias": {"70": 100}},
        {**REPEATS, "top_logprobs": 3},
        {"prompt": "Hello", "max_tokens": 20, "temperature": 5.0, "top_k": 1},
    ]
    alone = [manager.generate(model=TINY, **request) for request in requests]
    together = run_concurrently(manager, requests + requests)
    for i, request in enumerate(requests):
        for result in (together[i], together[i + len(requests)]):
            assert (result.text, result.usage, result.logprobs) == (alone[i].text, alone[i].usage, alone[i].logprobs), (
                f"request {request} answered differently in the batch"
            )


def test_a_seeded_sampled_request_with_penalties_reproduces_its_seed_among_batched_ones(make_manager):
    manager = make_manager()
    seeded = {"prompt": "Hello", "max_tokens": 30, "temperature": 0.9, "seed": 5, "frequency_penalty": 1.0}
    alone = manager.generate(model=TINY, **seeded)
    others = [{**REPEATS, "presence_penalty": 1.0}, {"prompt": "other", "max_tokens": 20, "temperature": 1.0}]
    together = run_concurrently(manager, [*others, seeded, *others])
    assert together[2].text == alone.text


@pytest.mark.parametrize("alone", [False, True], ids=["batched", "alone"])
def test_a_completion_keeps_its_first_space_and_a_chat_answer_drops_it(make_manager, alone):
    # mlx-lm's detokenizer drops the first leading space: "Hello" + " n" would read "Hellon".
    manager = make_manager()
    space_n = _tokenizer().token_to_id("\u0120n")  # " n" in the byte-level alphabet
    ask = {"model": TINY, "max_tokens": 3, "logit_bias": {space_n: 100}, "logprobs": True}
    if alone:  # a seeded sampled request runs by itself, through mlx-lm's single-request generator
        ask |= {"temperature": 1.0, "seed": 1}
    completion = manager.generate(prompt="Hello", **ask)
    assert completion.text == " n n n"
    assert b"".join(bytes(e["bytes"]) for e in completion.logprobs).decode() == completion.text
    chat = manager.generate(messages=[{"role": "user", "content": "Hello"}], **ask)
    assert chat.text == "n n n"


# -- token bytes, for every way a tokenizer spells its pieces ----------------------------------------------


def test_byte_level_pieces_spell_their_bytes_even_part_of_a_character():
    pieces = {0: "Ġthe", 1: "âĢ", 2: "<|user|>", 3: "Ċ"}
    spell = TokenBytes(pieces.get, "bpe", None)
    assert [spell(t) for t in range(4)] == [b" the", b"\xe2\x80", b"<|user|>", b"\n"]
    e = entry(1, -float("inf"), [(0, -0.5)], spell)
    assert e == {
        "token": "\\xe2\\x80",
        "bytes": [0xE2, 0x80],
        "logprob": -9999.0,
        "top_logprobs": [{"token": " the", "bytes": list(b" the"), "logprob": -0.5}],
    }


def test_sentencepiece_pieces_spell_spaces_and_byte_tokens():
    pieces = {0: "\u2581Hello", 1: "<0x0A>", 2: "<0xE2>"}
    spell = TokenBytes(pieces.get, "spm", None)
    assert [spell(t) for t in range(3)] == [b" Hello", b"\n", b"\xe2"]
    plain = TokenBytes(None, "plain", lambda ids: {5: "é"}[ids[0]])
    assert plain(5) == "é".encode()


def test_the_workers_shared_samplers_are_bounded_however_many_temperatures_clients_send():
    decoder = Decoder(SimpleNamespace(out=None))
    decoder.vocab_size = 384
    for i in range(3 * MAX_SAMPLERS):
        decoder._sampler({"temperature": 0.5 + i / 1000})
        assert len(decoder._samplers) <= MAX_SAMPLERS
    assert decoder._sampler({"temperature": 0.7}) is decoder._sampler({"temperature": 0.7}), "equal requests share"
