"""What a question names that the docs never do: the second signal of "I don't know", beside relevance.

A question about Salesforce, SAML or a `--canary-weight` option scores a high cosine against docs that describe
integrations, sign-in and options in general: relevance alone cannot tell it is unanswerable. What can is that
the docs never use the word. A key term (a content word, less the product's name and the words every support
question has) is *unknown* when the index's text never holds it and it names something specific: it is not a
common English word (the whole words of the bundled embedder's WordPiece vocabulary, which is built from English
text), or it is written with a capital inside the sentence (Helm, PHP), or it is shaped like an identifier
(`QUILL_REDIS_URL`, `two-factor`). Misspellings are forgiven: a long word one edit away from a common word or a
word of the docs is a typo, not a new thing. Numbers and times ("9am", "v2") never count.
"""

import functools
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune_kit.store import Store

DocsHave = Callable[[str], bool]  # whether the indexed docs use a word (in any of its forms)
_STOP_WORDS = """a about above after again against all am an and any are aren as at be because been before being below
    between both but by can cannot could did do does doing don down during each either else ever every few for
    from further get got had has have having he her here hers herself him himself his how i if in into is isn it
    its itself just let me might more most much must my myself need no nor not now of off on once one only or
    other ought our ours ourselves out over own please same shall she should so some such tell than thank thanks
    that the their theirs them themselves then there these they this those through to too under until up upon
    us use using very want was way we were what whats when where whether which while who whom whose why will with
    without would yes yet you your yours yourself yourselves
    dont doesnt didnt isnt arent wasnt werent cant couldnt wouldnt shouldnt wont whats hows im ive youre theyre thats"""  # typed without the apostrophe
STOP_WORDS = frozenset(_STOP_WORDS.split())  # English words too common to search for
_CHAT_REPLIES = {"ok", "okay", "yes", "no"}
_CONTENT_STOP_WORDS = STOP_WORDS | _CHAT_REPLIES  # search's stop words, and the replies of a chat
_CONTENT_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*")
MIN_TYPO_LENGTH = 6  # a shorter word one edit from a known one is as likely a different word (redis, reds)
# Words in every support question: a question is not "about" these, so they are no evidence either way.
_GENERIC_TEXT = (
    "use using used get set make way ways feature features support supported possible product docs"
    " documentation work works working need want able there option options say says tell know details detail"
    " given explain describe described mean means happen happens user users"
)
_GENERIC = frozenset(_GENERIC_TEXT.split())
_NUMBERISH = re.compile(r"v?\d[\d.,:]*[a-z]{0,3}")  # 9am, 100ms, v2, 1.5s, 3.11
_CAPITALISED = re.compile(r"(?<![\w'\u2019])[A-Z][\w-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:]\s+|\n\s*)[\"'“(]*$")


def content_words(text: str) -> set[str]:
    """The lower-cased words of `text` that carry meaning (no stop words)."""
    words = (word.strip(".-") for word in _CONTENT_WORD.findall(text.lower()))
    return {word for word in words if word and word not in _CONTENT_STOP_WORDS}


def key_terms(question: str, product: str) -> set[str]:
    """The words of a question that say what it is about."""
    words = content_words(question) - content_words(product) - _GENERIC
    return {word for word in words if len(word) > 2 and not _NUMBERISH.fullmatch(word)}


def docs_vocabulary(store: "Store") -> DocsHave:
    """Whether the index's text (titles, headings, chunks; stemmed by FTS5) holds a word."""
    from finetune_kit.retrieval.search import fts_query

    @functools.cache
    def docs_have(word: str) -> bool:
        query = "SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT 1"
        return store.scalar(query, (fts_query([word]),)) is not None

    return docs_have


def docs_words(store: "Store") -> frozenset[str]:
    """Every distinct term of the index (FTS5's stems), read through its fts5vocab view."""
    store.db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab USING fts5vocab(main, chunks_fts, row)"
    )
    return frozenset(row[0] for row in store.db.execute("SELECT term FROM temp.chunks_vocab"))


class KnownWords:
    """Common English words, and the words of one index, each with its one-edit neighbourhood for typos."""

    def __init__(self, common: Iterable[str], docs: Callable[[], Iterable[str]]) -> None:
        self.common = frozenset(common)
        self._docs = docs

    @functools.cached_property
    def _near(self) -> frozenset[str]:
        """Every known word of typo length and its one-letter deletions (the symmetric-delete method)."""
        words = {w for w in (*self.common, *self._docs()) if len(w) >= MIN_TYPO_LENGTH - 1}
        return frozenset(words | {d for w in words for d in _deletions(w)})

    def is_typo(self, word: str) -> bool:
        """Whether `word` is one insertion, deletion, substitution or swap away from a known word."""
        if len(word) < MIN_TYPO_LENGTH:
            return False
        return word in self._near or any(d in self._near for d in _deletions(word))


def _deletions(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i in range(len(word))]


@functools.cache
def common_english() -> frozenset[str]:
    """The whole words of the bundled embedder's vocabulary (about 20,000); empty when it is not installed."""
    from finetune_kit.errors import ExtraMissingError
    from finetune_kit.retrieval.minilm import model_dir

    try:
        lines = (model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    except (ExtraMissingError, OSError):
        return frozenset()
    return frozenset(w for w in lines if w.isalpha() and w.islower() and len(w) > 1)


def capitalised_words(question: str) -> set[str]:
    """The lower-cased words written with a capital where a sentence does not start (Helm, PHP, Okta)."""
    return {
        m.group().lower().strip("-")
        for m in _CAPITALISED.finditer(question)
        if not _SENTENCE_START.search(question[: m.start()])
    }


def unknown_terms(question: str, product: str, docs_have: DocsHave, known: KnownWords) -> list[str]:
    """The key terms of `question` that name something specific the docs never mention, sorted."""
    capitalised = capitalised_words(question)
    unknown = []
    for term in key_terms(question, product):
        if docs_have(term):
            continue
        identifier = not term.isalpha()  # QUILL_REDIS_URL, two-factor, config.yaml
        rare = bool(known.common) and term not in known.common
        if (identifier or rare or term in capitalised) and not (term.isalpha() and known.is_typo(term)):
            unknown.append(term)
    return sorted(unknown)
