"""Log-probability entries of generated tokens: each token's text, its bytes and its likeliest alternatives."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

# What a token impossible after the penalties scores: JSON has no -Infinity, and OpenAI uses this.
FLOOR = -9999.0


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves,
    the rest for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


class TokenBytes:
    """Token id -> the bytes it stands for, however the tokenizer spells its pieces.

    A token may be part of a UTF-8 character, so its bytes (not its text) are what the
    OpenAI ``bytes`` field and a faithful view of the answer need.

    Args:
        pieces: ``convert_ids_to_tokens``-style function, id -> the vocabulary's piece.
        kind: ``"bpe"`` (byte-level pieces), ``"spm"`` (``▁`` for a space, ``<0xNN>`` for a byte)
            or ``"plain"``, in which case ``decode`` (ids -> text) spells the token.
    """

    def __init__(self, pieces: Any, kind: str, decode: Any) -> None:
        self._pieces = pieces
        self._kind = kind
        self._decode = decode
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        if token not in self._cache:
            self._cache[token] = self._spell(token)
        return self._cache[token]

    def _spell(self, token: int) -> bytes:
        if self._kind == "plain":
            return self._decode([token]).encode()
        piece = self._pieces(token) or ""
        if self._kind == "spm":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        alphabet = _byte_level_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return piece.encode()  # an added token, spelt as written


def _text(raw: bytes) -> str:
    """A token's text: part of a UTF-8 character shows as ``\\xNN`` escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def entry(token: int, logprob: float, alternatives: list[tuple[int, float]], spell: TokenBytes) -> dict[str, Any]:
    """One generated token as the worker reports it: ``{token, bytes, logprob, top_logprobs}``."""
    raw = spell(token)
    return {
        "token": _text(raw),
        "bytes": list(raw),
        "logprob": _logprob(logprob),
        "top_logprobs": [
            {"token": _text(b := spell(t)), "bytes": list(b), "logprob": _logprob(lp)} for t, lp in alternatives
        ],
    }
