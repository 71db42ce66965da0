"""Continuous batching in the worker: concurrent requests share decoding steps without changing answers."""

from __future__ import annotations

import threading
from typing import Any

from mlx_jupyter.engine import protocol as p
from tests.helpers import run_concurrently
from tests.models import LONG, PYDOC, TINY
from tests.worker_frames import drain, submit

# Different lengths, budgets and stop strings, on the trained model: its greedy answers
# differ from prompt to prompt, so answers mixed up between batch rows would show at once.
GREEDY = [
    {"prompt": "The for statement", "max_tokens": 40, "seed": 7},
    {"prompt": "Hello", "max_tokens": 25, "temperature": 0.0},
    {"prompt": "Once upon a time, in a land of many words and long prompts", "max_tokens": 60},
    {"prompt": "A list is", "max_tokens": 30, "stop": ["class_getitem"]},
]


def test_greedy_answers_are_the_same_alone_and_in_a_batch_with_other_requests(make_manager):
    manager = make_manager()
    alone = [manager.generate(model=PYDOC, **request) for request in GREEDY]
    assert len({a.text for a in alone}) == len(GREEDY), "the prompts must have different answers"
    sampled = {"prompt": "Some sampled text", "max_tokens": 50, "temperature": 0.9, "top_p": 0.9}
    together = run_concurrently(manager, [*GREEDY, sampled, *GREEDY], model=PYDOC)
    for i, request in enumerate(GREEDY):
        for result in (together[i], together[i + len(GREEDY) + 1]):
            assert (result.text, result.finish_reason, result.usage) == (
                alone[i].text,
                alone[i].finish_reason,
                alone[i].usage,
            ), f"request {request} answered differently in the batch"
    assert alone[3].finish_reason == "stop" and "class_getitem" not in alone[3].text
    assert together[len(GREEDY)].usage["completion_tokens"] > 0


def test_a_seeded_sampled_request_runs_alone_and_reproduces_its_seed_among_batched_ones(make_manager):
    manager = make_manager()
    seeded = {"prompt": "Hello", "max_tokens": 40, "temperature": 0.9, "seed": 11}
    alone = manager.generate(model=TINY, **seeded)
    assert len(set(alone.text)) > 3, "a sampled answer should not be one repeated character"
    others = [{"prompt": f"other {i}", "max_tokens": 30 + 10 * i, "temperature": 1.0} for i in range(3)]
    together = run_concurrently(manager, [*others, seeded, *others])
    assert together[3].text == alone.text


def test_a_request_joins_a_running_batch_instead_of_waiting_for_it(make_manager):
    # Served one at a time, the short request would wait for 100k tokens (minutes).
    manager = make_manager()
    long = manager.stream_generate("x", model=TINY, max_tokens=LONG)
    next(long)
    try:
        (short,) = run_concurrently(manager, [{"prompt": "Hello", "max_tokens": 20}])
        assert short.finish_reason == "length" and short.usage["completion_tokens"] == 20
        assert manager.status()[0].active_requests == 1, "the long request should still be running"
    finally:
        long.close()


def test_cancelling_one_request_mid_batch_ends_it_in_the_worker_and_the_others_finish_unchanged(spawn_worker):
    worker = spawn_worker()
    requests = [{"prompt": f"{word}", "max_tokens": 150} for word in ("abc", "Hello", "12345")]
    expected = [drain(submit(worker, f"alone-{i}", **r))[0] for i, r in enumerate(requests)]
    victim = submit(worker, "victim", prompt="x", max_tokens=LONG)
    others = [submit(worker, f"batched-{i}", **r) for i, r in enumerate(requests)]
    results: list[Any] = [None] * len(others)

    def collect(i: int) -> None:
        results[i] = drain(others[i])

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(others))]
    for t in threads:
        t.start()
    # Cancel once the victim has streamed a while, with the others in the batch beside it.
    _, done, tokens = drain(victim, on_token=lambda n: n == 20 and worker.cancel("victim"))
    for t in threads:
        t.join(30)
    assert done["type"] == p.T_DONE and done["finish_reason"] == "cancelled", done
    assert 20 <= done["usage"]["completion_tokens"] < LONG and tokens == done["usage"]["completion_tokens"]
    for (got, final, count), want in zip(results, expected, strict=True):
        assert final["finish_reason"] == "length" and count == 150
        assert got == want


def test_an_empty_prompt_fails_alone_while_a_batched_request_finishes(spawn_worker):
    worker = spawn_worker()
    good = submit(worker, "good", prompt="Hello", max_tokens=30)
    frames = worker.open("empty")
    worker.send({"op": p.OP_GENERATE, "request_id": "empty", "prompt": "", "max_tokens": 5, "stop": []})
    _, bad, _ = drain(frames)
    assert bad["type"] == p.T_ERROR and bad["code"] == "invalid_request" and "empty" in bad["message"]
    _, done, count = drain(good)
    assert done["finish_reason"] == "length" and count == 30
