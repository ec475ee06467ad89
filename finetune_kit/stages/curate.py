"""Curate the answered questions into the dataset: drop near duplicates across chunks, add paraphrases.

Paraphrases (paraphrases_per_question) are other phrasings of a training question with the same answer: cached
calls like every other, never for a question held out for validation, and a phrasing too close to the question or
to another phrasing (near_duplicate_threshold, as within a chunk) is dropped.
"""

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.prompts import load_prompt
from finetune_kit.stages import gather_all
from finetune_kit.stages.build_dataset import DatasetReport, accepted_examples
from finetune_kit.stages.dataset import Example, split_by_chunk
from finetune_kit.stages.dedupe import drop_corpus_duplicates
from finetune_kit.stages.questions import select_questions
from finetune_kit.store import Store

PARAPHRASE_STAGE = "paraphrases"
PARAPHRASE_MAX_TOKENS = 40  # per phrasing asked for
NEAR_DUPLICATES = "near duplicates across chunks"
PARAPHRASES = "paraphrases"
PARAPHRASES_DROPPED = "paraphrases dropped"


def paraphrase_request(settings: Settings, question: str) -> ChatRequest:
    """The request for `paraphrases_per_question` other phrasings of `question`."""
    template = load_prompt("paraphrases", settings.prompts_dir)
    n = settings.paraphrases_per_question
    return ChatRequest(
        stage=PARAPHRASE_STAGE,
        messages=(("user", template.render(product=settings.product, question=question, n=n)),),
        temperature=settings.paraphrase_temperature,
        max_tokens=PARAPHRASE_MAX_TOKENS * n,
        template_version=template.version,
        stop=(f"\n{n + 1}.",),
    )


def select_paraphrases(output: str, question: str, settings: Settings) -> tuple[list[str], int]:
    """The usable phrasings in `output` and how many were dropped (malformed, or near duplicates)."""
    wanted = settings.paraphrases_per_question
    judged = select_questions(output, wanted + 1, [question], settings.near_duplicate_threshold)
    kept = [c.text for c in judged if c.accepted][:wanted]
    return kept, len(judged) - len(kept)


def training_examples(store: Store, settings: Settings, identity: str, model: str) -> list[Example]:
    """The accepted examples after near duplicates across chunks are dropped, less those held out."""
    examples = accepted_examples(store, settings, identity, model)
    held_out = split_by_chunk(
        [e.chunk_id for e in examples], settings.validation_fraction, settings.split_seed
    )
    return [e for e in examples if e.chunk_id not in held_out]


async def paraphrase_training_questions(
    store: Store,
    client: LLMClient,
    settings: Settings,
    report: DatasetReport,
    progress: Progress | None = None,
) -> list[Example]:
    """Other phrasings of every training question, each with its question's answer (cached; none when 0 wanted)."""
    identity, model = client.endpoint.identity, client.endpoint.model
    _count(report, NEAR_DUPLICATES, drop_corpus_duplicates(store, settings, identity, model))
    if settings.paraphrases_per_question == 0:
        return []
    progress = progress or NoProgress()
    todo = training_examples(store, settings, identity, model)
    made: list[Example] = []
    progress.start("paraphrase questions", len(todo))

    async def one(example: Example) -> None:
        try:
            result = await client.chat(paraphrase_request(settings, example.question))
        except RequestRejectedError:
            report.curation[PARAPHRASES_DROPPED] += settings.paraphrases_per_question
            return
        kept, dropped = select_paraphrases(result.content, example.question, settings)
        made.extend(Example(example.chunk_id, text, example.answer, paraphrase=True) for text in kept)
        report.curation[PARAPHRASES_DROPPED] += dropped
        progress.advance()

    try:
        await gather_all([one(example) for example in todo])
    finally:
        progress.finish()
    _count(report, PARAPHRASES, len(made))
    return sorted(made, key=lambda e: (e.chunk_id, e.question))


def curated_examples(
    store: Store,
    settings: Settings,
    identity: str,
    model: str,
    paraphrases: list[Example],
    report: DatasetReport,
) -> list[Example]:
    """What build-dataset writes: the accepted examples, near duplicates across chunks left out, then paraphrases."""
    _count(report, NEAR_DUPLICATES, drop_corpus_duplicates(store, settings, identity, model))
    return accepted_examples(store, settings, identity, model) + paraphrases


def _count(report: DatasetReport, what: str, n: int) -> None:
    """Set one curation count; a step that did nothing is left out of the summary."""
    if n:
        report.curation[what] = n
    else:
        report.curation.pop(what, None)
