"""Property-based tests: keep_alive parsing, request validation and IPC framing hold for any input."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlx_jupyter.engine.errors import InvalidRequestError
from mlx_jupyter.engine.field_checks import ROLES, Limits
from mlx_jupyter.engine.keep_alive import parse_keep_alive
from mlx_jupyter.engine.protocol import ChannelClosed, encode, read_frame, write_frame
from mlx_jupyter.engine.request import GenerationRequest
from tests.models import TINY, TINY_A

# Modest example counts keep the module fast; no per-example deadline, since the machine is shared.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What a JSON body can hold once decoded (Python's json also gives big integers and infinities).
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Everything that survives a JSON round trip unchanged: NaN is the one value not equal to itself.
exact_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=12), exact_values, max_size=6)

UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
duration_strings = st.from_regex(r"\A[+-]{0,3}\s?\d{1,6}(\.\d{1,3})?(ms|s|m|h)?(\d{1,3}(ms|s|m|h))?\s?\Z")


# --- keep_alive ---------------------------------------------------------------------------


@FAST
@given(json_values | duration_strings)
@example(10**400)  # an integer of 400 digits: float() of it overflows
@example(-(10**400))
@example("1" * 400)  # a number too big for a float: inf
@example("nan")
def test_keep_alive_of_any_json_value_is_finite_seconds_none_or_a_clear_error(value: Any):
    try:
        seconds = parse_keep_alive(value)
    except InvalidRequestError as exc:
        assert str(exc), "the error says what is wrong"
        return
    assert (seconds is None) == (value is None), "only an absent keep_alive means the idle_timeout"
    assert seconds is None or (type(seconds) is float and math.isfinite(seconds)), seconds


@FAST
@given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999), st.sampled_from(["", " "]))
@example(1, 30, 0, 0, "")  # "1h30m"
@example(0, 0, 90, 0, "")  # "90s"
def test_a_duration_in_units_gives_its_seconds(hours: int, minutes: int, seconds: int, millis: int, pad: str):
    parts = {"h": hours, "m": minutes, "s": seconds, "ms": millis}
    text = "".join(f"{n}{unit}" for unit, n in parts.items() if n) or "0s"
    expected = sum(n * UNITS[unit] for unit, n in parts.items())
    assert parse_keep_alive(f"{pad}{text}{pad}") == pytest.approx(expected)
    if expected:
        assert parse_keep_alive(f"-{text}") < 0, "a leading minus means never unload"


@FAST
@given(st.integers(0, 10**6) | st.floats(0, 1e6))
def test_seconds_as_a_number_or_a_numeric_string_give_themselves(number: float):
    assert parse_keep_alive(number) == float(number)
    text = f"{number:.3f}".rstrip("0").rstrip(".")  # plain decimals, as a person writes them
    assert parse_keep_alive(text) == pytest.approx(float(text))


@FAST
@given(st.integers(max_value=-1) | st.floats(max_value=-1e-9, allow_infinity=False))
@example(-(10**400))
def test_a_negative_number_means_never_unload(number: float):
    seconds = parse_keep_alive(number)
    assert seconds is not None and seconds < 0 and math.isfinite(seconds)
    if -1e15 < number <= -0.001:
        assert parse_keep_alive(f"{number:.3f}") < 0


@FAST
@given(st.text("+-", min_size=2, max_size=3), st.integers(0, 10**6), st.sampled_from(["", "s", "m", "h", "ms"]))
@example("--", 5, "")  # "--5" was read as -5
def test_a_duration_with_more_than_one_sign_is_refused(signs: str, number: int, unit: str):
    with pytest.raises(InvalidRequestError, match="keep_alive"):
        parse_keep_alive(f"{signs}{number}{unit}")


@FAST
@given(
    st.floats(min_value=threading.TIMEOUT_MAX, max_value=1e300, exclude_min=True)
    | st.integers(min_value=int(threading.TIMEOUT_MAX) + 1, max_value=10**400)
    | st.integers(min_value=int(threading.TIMEOUT_MAX) // 3600 + 1, max_value=10**12).map(lambda h: f"{h}h")
)
@example(1e10)
@example("99999999h")
def test_a_duration_too_long_to_wait_for_means_never(value: Any):
    """Anything the reaper could not pass to ``Event.wait`` (over ``threading.TIMEOUT_MAX``) means never unload."""
    seconds = parse_keep_alive(value)
    assert seconds is not None and seconds < 0 and math.isfinite(seconds)


@FAST
@given(json_values | duration_strings)
@example(1e10)
@example(1e308)
@example("99999999h")
def test_every_keep_alive_the_parser_accepts_can_be_waited_for(value: Any):
    try:
        seconds = parse_keep_alive(value)
    except InvalidRequestError:
        return
    assert seconds is None or seconds < 0 or seconds <= threading.TIMEOUT_MAX, seconds


# --- GenerationRequest.parse ---------------------------------------------------------------------

messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | json_values, "content": st.text(max_size=20) | json_values}
    ),
    max_size=3,
)
# Each field: values a client would send, mixed with anything JSON can hold.
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([TINY, TINY_A]) | json_values,
        "prompt": st.text(max_size=20) | json_values,
        "messages": messages | json_values,
        "max_tokens": st.integers(-5, 2000) | json_values,
        "temperature": st.floats(-1, 200) | json_values,
        "top_p": st.floats(-0.5, 1.5) | json_values,
        "seed": st.integers(-5, 2**64) | json_values,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
        "keep_alive": duration_strings | json_values,
    },
)


@FAST
@given(request_fields, st.integers(1, 4096))
@example({"prompt": "hi", "keep_alive": 10**400}, 4096)  # every other field valid: the parser is reached
@example({"prompt": "hi", "temperature": 10**400}, 4096)
@example({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, 4096)
def test_a_request_from_any_json_values_is_valid_in_every_field_or_a_clear_error(fields: dict, limit: int):
    try:
        request = GenerationRequest.parse(fields, Limits(max_tokens=limit))
    except InvalidRequestError as exc:
        assert str(exc), "the error says what is wrong"
        return
    assert request.model is None or (isinstance(request.model, str) and request.model)
    assert (request.prompt is None) != (request.messages is None), "exactly one of prompt and messages"
    assert request.prompt is None or (isinstance(request.prompt, str) and request.prompt)
    if request.messages is not None:
        assert isinstance(request.messages, list) and request.messages
        for message in request.messages:
            assert message["role"] in ROLES and isinstance(message["content"], str)
    assert type(request.max_tokens) is int and 1 <= request.max_tokens <= limit
    assert type(request.temperature) is float and math.isfinite(request.temperature) and request.temperature >= 0
    assert type(request.top_p) is float and 0 <= request.top_p <= 1
    assert request.seed is None or (type(request.seed) is int and 0 <= request.seed < 2**64)
    assert isinstance(request.stop, list) and all(isinstance(s, str) and s for s in request.stop)
    assert request.keep_alive is None or (type(request.keep_alive) is float and math.isfinite(request.keep_alive))
    # What the client gave is what runs.
    for name in ("model", "prompt", "max_tokens", "seed"):
        if fields.get(name) is not None:
            assert getattr(request, name) == fields[name], name


# --- IPC framing --------------------------------------------------------------------------


class Pipe:
    """A real ``os.pipe()`` whose write end is fed by a thread and then closed, so a read ends."""

    def __init__(self, write) -> None:
        self.read_fd, self._write_fd = os.pipe()
        self._writer = threading.Thread(target=self._write, args=(write,), daemon=True)
        self._writer.start()

    def _write(self, write) -> None:
        try:
            write(self._write_fd)
        except BrokenPipeError:
            pass  # the reader closed its end after the frame it wanted
        finally:
            os.close(self._write_fd)

    def read(self, timeout: float = 30) -> Any:
        """``read_frame`` on the read end, in a thread: a read that hangs fails the test instead of the run."""
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append(read_frame(self.read_fd))
            except BaseException as exc:  # judged by the caller
                outcome.append(exc)

        reader = threading.Thread(target=run, daemon=True)
        reader.start()
        reader.join(timeout)
        assert outcome, "read_frame hung on a pipe whose writer has closed"
        return outcome[0]

    def close(self) -> None:
        os.close(self.read_fd)
        self._writer.join(30)
        assert not self._writer.is_alive()


def write_all(data: bytes):
    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


@FAST
@given(st.lists(json_objects, max_size=4))
@example([{"text": "é€😀", "big": 10**30, "nested": [[{"a": None}]]}])
@example([{"prompt": "x" * 200_000}])  # more than the pipe holds: the writer blocks until it is read
def test_frames_round_trip_any_json_objects_in_order_over_a_pipe(messages: list[dict]):
    pipe = Pipe(lambda fd: [write_frame(fd, m) for m in messages])
    try:
        for message in messages:
            assert pipe.read() == message
        assert isinstance(pipe.read(), ChannelClosed), "each frame is read exactly: nothing is left after the last"
    finally:
        pipe.close()


@FAST
@given(json_objects)
def test_encode_is_a_big_endian_length_then_that_many_bytes_of_json(message: dict):
    data = encode(message)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4 and json.loads(data[4:]) == message


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


arbitrary_bytes = (
    st.binary(max_size=64)  # anything at all
    | st.binary(max_size=64).map(framed)  # a right length, then anything
    | st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda t: struct.pack(">I", t[0]) + t[1])
    | st.text(max_size=30).map(lambda s: framed(s.encode()))  # text that is rarely JSON
    | exact_values.map(lambda v: framed(repr(v).encode()))  # Python literals: close to JSON
)


@FAST
@given(arbitrary_bytes)
@example(framed(b"1"))  # JSON, but not an object
@example(framed(b'["generate"]'))
@example(framed(b"\xff\xfe"))  # not UTF-8
@example(struct.pack(">I", 2**31) + b"{}")  # over the frame limit
@example(b"\x00\x00")  # a header cut short
def test_any_bytes_on_the_pipe_give_a_frame_channel_closed_or_a_value_error(data: bytes):
    pipe = Pipe(write_all(data))
    try:
        outcome = pipe.read()
    finally:
        pipe.close()
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, (ChannelClosed, ValueError)), repr(outcome)
    else:
        assert isinstance(outcome, dict), f"a frame is a JSON object, not {outcome!r}"


def test_a_frame_nested_deeper_than_json_can_decode_is_a_value_error():
    """100,000 brackets are far within the frame limit, and past the decoder's recursion limit."""
    pipe = Pipe(write_all(framed(b"[" * 100_000 + b"]" * 100_000)))
    try:
        outcome = pipe.read()
    finally:
        pipe.close()
    assert isinstance(outcome, ValueError), f"{type(outcome).__name__}: {str(outcome)[:200]}"
