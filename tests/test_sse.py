"""Server-Sent Events: what the server writes is what the clients (kernel, tests) read back."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import SSEError

from mlx_jupyter import sse


def test_an_encoded_event_decodes_to_its_name_and_data():
    body = sse.encode({"text": "é\u2028"}) + sse.encode({"type": "ready"}, "ready") + sse.encode(sse.DONE)
    assert body.startswith('data: {"text": ')
    events = sse.parse(body)
    assert [(e.event, e.data) for e in events][2] == ("message", "[DONE]")
    assert events[0].json() == {"text": "é\u2028"} and events[0].event == "message"
    assert (events[1].event, events[1].json()) == ("ready", {"type": "ready"})


def test_text_with_line_breaks_is_sent_as_several_data_lines_and_read_back_whole():
    encoded = sse.encode("one\ntwo\r\nthree\rfour")
    assert encoded == "data: one\ndata: two\ndata: three\ndata: four\n\n"
    assert [e.data for e in sse.parse(encoded)] == ["one\ntwo\nthree\nfour"]


def test_comments_and_events_without_data_are_skipped():
    body = sse.comment("ping") + "event: ping\n\n" + sse.encode({"a": 1})
    assert sse.comment("ping") == ": ping\n\n"
    assert [e.json() for e in sse.parse(body)] == [{"a": 1}]


class Chunks(httpx.SyncByteStream):
    """A response body that arrives in these pieces."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks


def test_events_split_anywhere_across_network_chunks_arrive_whole():
    body = (sse.encode({"text": "héllo"}) + sse.encode({"done": True}, "final")).encode()
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)]  # splits lines and a UTF-8 character
    response = httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=Chunks(chunks))
    events = list(sse.events(response))
    assert [(e.event, e.json()) for e in events] == [("message", {"text": "héllo"}), ("final", {"done": True})]


def test_a_response_that_is_not_an_event_stream_is_refused():
    response = httpx.Response(200, headers={"Content-Type": "application/json"}, content=b'{"a": 1}')
    with pytest.raises(SSEError):
        list(sse.events(response))
