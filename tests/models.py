"""The models the suite runs on, named once: their ids, and how long an answer a test holds open may be."""

from __future__ import annotations

TINY = "builtin:tiny"  # random weights: the fastest real model
TINY_CONTEXT = 32768  # tokens, prompt and answer together
PYDOC = "builtin:pydoc"  # trained on Python's documentation: continues text, for tests that need real text
PYDOC_CHAT = "builtin:pydoc-chat"  # the default: builtin:pydoc taught to answer questions about Python
# conftest's ``model_dir`` holds two copies of the tiny model under these ids.
TINY_A = "tiny-a"
TINY_B = "tiny-b"
# conftest's ``broken_model_dir`` holds the tiny model with garbage weights under this id.
BROKEN = "tiny-broken"

# max_tokens of an answer that must still be running when the test acts (greedy on "x" never
# meets tiny's end token): tens of seconds of tokens, within TINY_CONTEXT. A host that runs
# such answers raises its ``max_tokens_limit`` (8192 by default) to at least this.
LONG = 30_000
