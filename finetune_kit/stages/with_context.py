"""Retrieval-style examples (RAFT, Zhang et al. 2024): the question among retrieved chunks, as the bot serves it.

Each example's prompt is what `ftkit ask --rag` and the Slack bot send: retrieval/answer.py's grounded system
prompt over the sources fit_sources keeps in the bot's prompt budget, then the question (fit_to_context). The
sources are the question's search hits with its own (gold) chunk put among them at a seeded place; for
distractor_only_fraction of the examples the gold chunk is left out and the target is the bot's refusal. An
answered target cites the gold chunk by its number and passes check_citations as the bot would. Nothing here
calls a model: switching dataset_style only rebuilds the files.
"""

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError, VagueQueryError
from finetune_kit.retrieval.answer import check_citations, fit_sources, grounded_system_prompt, refusal_text
from finetune_kit.retrieval.search import Retriever
from finetune_kit.retrieval.types import Hit
from finetune_kit.slack.answerer import Turn, fit_to_context, prompt_budget
from finetune_kit.stages.dataset import Example
from finetune_kit.store import Store

DISTRACTORS_ONLY = "with context: distractors only"
_FENCE = re.compile(r"^\s*(```|~~~)")
_END = re.compile(r"([.!?:]?)(\s*)$")


def cite(answer: str, n: int) -> str:
    """The answer with `[n]` closing each prose paragraph (before its full stop), code blocks left alone."""
    out: list[str] = []
    cited = False
    in_code = False
    for paragraph in answer.split("\n\n"):
        lines = paragraph.splitlines()
        fences = sum(bool(_FENCE.match(line)) for line in lines)
        prose = not in_code and fences == 0 and paragraph.strip()
        in_code ^= fences % 2 == 1
        if prose and not paragraph.rstrip().endswith(":"):
            paragraph = _END.sub(lambda m: f" [{n}]{m[1]}{m[2]}", paragraph.rstrip(), count=1)
            cited = True
        out.append(paragraph)
    text = "\n\n".join(out)
    return text if cited else f"{text}\n\n[{n}]"


def _roll(settings: Settings, text: str) -> float:
    """A seeded number in [0, 1) for `text`: the same example gets the same draw on every build."""
    digest = hashlib.sha256(f"{settings.split_seed}\0{text}".encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


class ContextExamples:
    """Turns examples into with-context records over one workspace's index, counting what it could not do."""

    def __init__(self, store: Store, settings: Settings, counts: Counter[str], notes: list[str]) -> None:
        if settings.dataset_format != "chat":
            raise ConfigError(
                "dataset_style = with-context writes chat messages as the bot sends them"
                " — set dataset_format = chat, or dataset_style = closed-book"
            )
        self.settings, self.counts, self.notes = settings, counts, notes
        self.retriever = Retriever.open(store, settings)
        self.budget = prompt_budget(settings)
        self.n_chunks = int(store.scalar("SELECT count(*) FROM index_chunks") or 0)
        self.short = 0  # examples with fewer sources than retrieval.k
        self.no_distractor = 0  # distractor-only draws with no other chunk to show

    def record(self, example: Example) -> dict[str, Any]:
        """One chat record: the bot's system prompt and sources, the question, and the target."""
        k = self.settings.retrieval.k
        hits = self._search(example.question, k)
        if example.negative:
            return self._finish(example, hits[:k], example.answer)
        distractors = [hit for hit in hits if hit.chunk_id != example.chunk_id]
        if _roll(self.settings, "distractors\0" + example.question) < self.settings.distractor_only_fraction:
            if distractors:
                self.counts[DISTRACTORS_ONLY] += 1
                return self._finish(example, distractors[:k], refusal_text(self.settings, example.question))
            self.no_distractor += 1
        gold = next((hit for hit in hits if hit.chunk_id == example.chunk_id), None)
        gold = gold or self.retriever.chunk_hit(example.chunk_id)
        if gold is None:  # not in the index (index older than the chunk): the sources it has
            return self._finish(example, hits[:k], refusal_text(self.settings, example.question))
        others = distractors[: k - 1]
        place = int(_roll(self.settings, "place\0" + example.question) * (len(others) + 1))
        sources = self._fitted(example.question, [*others[:place], gold, *others[place:]], gold)
        n = next(i for i, hit in enumerate(sources, 1) if hit.chunk_id == gold.chunk_id)
        target, _ = check_citations(cite(example.answer, n), sources)
        return self._finish(example, sources, target, fitted=True)

    def finish(self) -> None:
        """Say in the run's notes what a small corpus left out."""
        k = self.settings.retrieval.k
        if self.short:
            self.notes.append(
                f"{self.short} with-context examples show fewer than retrieval.k = {k} chunks"
                f" (the index has {self.n_chunks} chunks, or they did not fit the prompt budget)"
            )
        if self.no_distractor:
            self.notes.append(
                f"{self.no_distractor} with-context examples drawn as distractors-only kept their own chunk:"
                " the search found no other chunk for them"
            )

    def _search(self, question: str, k: int) -> list[Hit]:
        try:
            return self.retriever.search(question, k=k + 1)  # one more: the gold chunk may be among them
        except VagueQueryError:
            return []

    def _fitted(self, question: str, hits: Sequence[Hit], gold: Hit) -> list[Hit]:
        """The sources the bot's prompt budget keeps, the gold chunk first if it would be cut."""
        sources = fit_sources(self.settings, hits, question, False, self.budget)
        if any(hit.chunk_id == gold.chunk_id for hit in sources):
            return sources
        rest = [hit for hit in hits if hit.chunk_id != gold.chunk_id]
        return fit_sources(self.settings, [gold, *rest], question, False, self.budget)

    def _finish(
        self, example: Example, hits: Sequence[Hit], target: str, fitted: bool = False
    ) -> dict[str, Any]:
        sources = (
            list(hits) if fitted else fit_sources(self.settings, hits, example.question, False, self.budget)
        )
        self.short += len(sources) < self.settings.retrieval.k
        system = grounded_system_prompt(self.settings, sources)
        messages = fit_to_context(system, [Turn("user", example.question)], self.budget)
        return {"messages": [*messages, {"role": "assistant", "content": target}]}
