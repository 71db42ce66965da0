"""Token ids to bytes and text: what each token spells, and the text of a stream of tokens."""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Any


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


class TextStream:
    """The text of generated tokens, from their bytes: a character split across tokens waits for its last byte.

    mlx-lm's streaming detokenizers drop the first token's leading space, which is right for a
    chat answer but loses a completion's (``"Hello"`` + ``" world"``), and would make the text
    disagree with the tokens' bytes; this one keeps it unless ``trim_first_space``.
    ``add_token``, ``finalize``, then ``last_segment`` (the text since the last read), as mlx-lm's.
    """

    def __init__(self, spell: TokenBytes, trim_first_space: bool) -> None:
        self._spell = spell
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._trim = trim_first_space
        self._pending = ""

    def add_token(self, token: int) -> None:
        self._add(self._decoder.decode(self._spell(token)))

    def finalize(self) -> None:
        self._add(self._decoder.decode(b"", final=True))

    def _add(self, text: str) -> None:
        if self._trim and text:
            text = text.removeprefix(" ")
            self._trim = not text  # a token that was only the space: trim the next one's instead
        self._pending += text

    @property
    def last_segment(self) -> str:
        segment, self._pending = self._pending, ""
        return segment
