"""Model answers as Markdown: Python identifiers outside code keep their underscores and stars."""

from __future__ import annotations

import re

# Code the answer already marks: fenced blocks (to their closing fence, or the end while
# streaming) and inline code spans. Nothing inside them changes.
_CODE = re.compile(
    r"^[ ]{0,3}(?P<fence>`{3,}|~{3,})[^\n]*\n.*?(?:^[ ]{0,3}(?P=fence)[^\n]*$|\Z)|(?P<ticks>`+).*?(?P=ticks)",
    re.DOTALL | re.MULTILINE,
)
# __init__, _private, object.__init__(), __all__: a leading underscore makes Markdown emphasis.
_UNDERSCORED = r"(?<![\w.\\])(?:[A-Za-z]\w*\.)*_+[A-Za-z0-9]\w*(?:\(\))?"
# *args, **kwargs: a star run glued to a name, that nothing later on the line closes as emphasis
# ("**Note:** ..." stays bold, "*word*" stays italic).
_STARRED = r"(?<![\w*\\])(?P<stars>\*{1,2})[A-Za-z_]\w*(?![\w*])(?![^\n]*[^\s*](?P=stars)(?!\*))"
_IDENTIFIER = re.compile(f"{_UNDERSCORED}|{_STARRED}")


def protect_identifiers(text: str) -> str:
    """``text`` with identifiers such as ``__init__``, ``*args`` and ``**kwargs`` outside code put in code spans.

    Chat UIs do the same: Markdown would render ``__init__`` as a bold "init" and pair the
    stars of ``*args`` with a later star. Fenced blocks and code spans are left as written.
    """
    out = []
    end = 0
    for match in _CODE.finditer(text):
        out.append(_IDENTIFIER.sub(r"`\g<0>`", text[end : match.start()]))
        out.append(match.group(0))
        end = match.end()
    out.append(_IDENTIFIER.sub(r"`\g<0>`", text[end:]))
    return "".join(out)
