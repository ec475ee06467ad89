"""Datasets that teach a model to stay grounded: "I don't know" examples and retrieval-style (RAFT) examples.

Over real HTTP against the fake OpenAI server, on the sample docs with a search index (the fake's embeddings).
"""

import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.pipeline import RunSummary, run_build_dataset, run_generate_questions, run_index, run_ingest
from finetune_kit.retrieval.answer import (
    Retrieval,
    answer_from_retrieval,
    format_context,
    grounded_system_prompt,
    refusal_text,
)
from finetune_kit.retrieval.search import Retriever
from finetune_kit.retrieval.types import Hit
from finetune_kit.slack.answerer import fit_to_context, prompt_budget
from finetune_kit.stages.negatives import JUDGE_STAGE, NO_INDEX, STAGE, parse_verdict
from finetune_kit.stages.with_context import DISTRACTORS_ONLY, cite
from finetune_kit.status import workspace_status
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY, TINY_DOCS
from tests.fake_openai import FakeOpenAI, Reply, docs_responder

CONTACT = "#quillstack-help"
PER_ROUND = 5  # questions the fake writes per negatives round
# What the fake's negatives name: none of these is in the sample docs, so each is a true "I don't know".
FOREIGN = (
    "Salesforce", "Zapier", "Jira", "Terraform", "SAML", "Android", "Shopify", "HubSpot", "Tableau", "Okta",
    "Airtable", "Notion", "Trello", "Asana", "Figma", "Dropbox", "Zendesk", "Twilio", "Stripe", "Mailchimp",
    "Snowflake", "BigQuery", "Datadog", "PagerDuty", "Heroku", "Netlify", "Vercel", "Cloudflare", "Auth0", "Segment",
    "Intercom", "Freshdesk", "Monday", "Basecamp", "Confluence", "Bitbucket", "Gitea", "Jenkins", "CircleCI",
    "Travis",
)  # fmt: skip
JUDGED_ANSWERED = "Zapier"  # the fake judge says the docs answer a question naming it
ANSWERABLE = "How do I create a flag key with the Python SDK?"  # every key term is in the docs: dropped
_NEGATIVES_PROMPT = 'must say "I don\'t know"'
_NEGATIVES_JUDGE = "Verdict: answered or not answered"


SHAPES = (  # one of each a round: the negatives parser drops near copies within one list
    "Can Quillstack sync feature flags with {}?",
    "Is there a {} integration I can turn on?",
    "How do I log in with my {} account?",
    "Where is the export to {} button?",
    "Does the SDK run inside {} workers?",
)


def negatives_of_round(seed: int) -> list[str]:
    names = FOREIGN[seed * PER_ROUND : (seed + 1) * PER_ROUND]
    questions = [shape.format(name) for shape, name in zip(SHAPES, names, strict=True)]
    return [ANSWERABLE, *questions] if seed == 0 else questions


def foreign_name(question: str) -> str:
    return next(name for name in FOREIGN if name in question)


def grounded_responder(body: dict[str, Any]) -> Reply:
    """docs_responder, plus negatives (PER_ROUND a round, differing by seed) and their judge."""
    prompt = body["messages"][-1]["content"]
    if _NEGATIVES_PROMPT in prompt:
        lines = negatives_of_round(int(body.get("seed") or 0))
        return Reply(content="\n".join(f"{i}. {q}" for i, q in enumerate(lines, 1)))
    if _NEGATIVES_JUDGE in prompt:
        question = re.search(r"^Question: (.*)$", prompt, re.M)
        said = "answered" if question and JUDGED_ANSWERED in question.group(1) else "not answered"
        return Reply(content=f"Verdict: {said}")
    return docs_responder(body)


@pytest.fixture
def grounded_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(grounded_responder, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        yield fake


def settings_for(tmp_path: Path, **flags: object) -> Settings:
    flags = {"grounding_judge": False, "dedupe_across_chunks": False, "support_contact": CONTACT, **flags}
    return load_settings(
        workspace=tmp_path / "ws",
        product="Quillstack",
        model="gpt-4o-mini",
        retrieval_embedding_model="text-embedding-3-small",
        **flags,
    )


def built(settings: Settings, index: bool = True) -> RunSummary:
    run_ingest(settings, [str(SAMPLE_DOCS)])
    if index:
        run_index(settings)
    run_generate_questions(settings)
    return run_build_dataset(settings)


def records(settings: Settings, name: str) -> list[dict[str, Any]]:
    lines = (settings.dataset_path / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def is_refusal(record: dict[str, Any]) -> bool:
    return "so I won't guess" in record["messages"][-1]["content"]


def calls_by_stage(settings: Settings) -> Counter[str]:
    """The paid calls of the last run, by stage."""
    with Store(settings.db_path) as store:
        run_id = store.scalar("SELECT max(id) FROM runs")
        rows: list[sqlite3.Row] = store.db.execute(
            "SELECT stage, count(*) FROM llm_calls WHERE run_id = ? GROUP BY stage", (run_id,)
        ).fetchall()
    return Counter({row[0]: row[1] for row in rows})


def accepted_answers(settings: Settings) -> int:
    train, validation = records(settings, "train"), records(settings, "validation")
    return sum(not is_refusal(r) for r in train + validation)


# --- "I don't know" examples ----------------------------------------------------------------------------


def test_negatives_are_questions_the_docs_do_not_answer_with_the_bots_refusal(
    tmp_path: Path, grounded_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, grounding_judge=True)
    summary = built(settings)

    train, validation = records(settings, "train"), records(settings, "validation")
    negatives = [r for r in train + validation if is_refusal(r)]
    asked = [r["messages"][-2]["content"] for r in negatives]
    n_answered = len(train) + len(validation) - len(negatives)
    assert len(negatives) == -(
        -n_answered // 10
    )  # negatives_fraction 0.1 of the answered examples, rounded up
    assert ANSWERABLE not in asked and not any(JUDGED_ANSWERED in q for q in asked)
    for record in negatives:
        question, answer = record["messages"][-2]["content"], record["messages"][-1]["content"]
        name = foreign_name(question)
        # the bot's refusal: naming the term when its unknown-terms gate knows the word is foreign, else plain
        bots = {refusal_text(settings, question, (name.lower(),)), refusal_text(settings, question)}
        assert answer in bots and CONTACT in answer
    assert any(is_refusal(r) for r in train) and any(is_refusal(r) for r in validation)
    assert summary.dataset is not None
    assert summary.dataset.curation["negatives"] == len(negatives)
    assert summary.dataset.curation["negatives dropped: the docs use every key term"] == 1
    assert summary.dataset.curation["negatives dropped: the judge finds the docs answer it"] == 1
    status = workspace_status(settings)
    assert status.dataset is not None and status.dataset.negatives == len(negatives)


def test_without_an_index_there_are_no_negatives_and_the_summary_says_why(
    tmp_path: Path, grounded_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path)
    summary = built(settings, index=False)

    assert summary.dataset is not None and any(note.startswith(NO_INDEX) for note in summary.dataset.notes)
    assert not any(is_refusal(r) for r in records(settings, "train") + records(settings, "validation"))
    assert not calls_by_stage(settings)[STAGE]


def test_the_refusal_names_the_support_contact_only_when_one_is_set(tmp_path: Path) -> None:
    plain = load_settings(workspace=tmp_path, product="Quillstack")
    assert refusal_text(plain, "sso?").endswith("or ask a person.")
    assert refusal_text(plain.model_copy(update={"support_contact": CONTACT}), "sso?").endswith(
        f"or ask a person: {CONTACT}."
    )


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Verdict: not answered", True),
        ("Verdict: answered", False),
        ("verdict - Unanswered.", True),
        ("not answered", True),
        ("Answered, in part.", False),
        ("I think so", None),
    ],
)
def test_parse_verdict(reply: str, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_negatives_fraction_zero_asks_nothing_for_negatives(tmp_path: Path, grounded_llm: FakeOpenAI) -> None:
    settings = settings_for(tmp_path, negatives_fraction=0)
    built(settings)
    assert not any(is_refusal(r) for r in records(settings, "train") + records(settings, "validation"))
    with Store(settings.db_path) as store:
        assert not store.scalar("SELECT count(*) FROM llm_calls WHERE stage IN (?, ?)", (STAGE, JUDGE_STAGE))


# --- retrieval-style examples (RAFT) ---------------------------------------------------------------------


class RecordingAnswerer:
    """The bot's Answerer seam: records the system prompt and turns it is sent, replies with a set text."""

    model = "recorder"

    def __init__(self, settings: Settings, reply: str) -> None:
        self.prompt_budget = prompt_budget(settings)
        self.reply, self.sent = reply, []  # type: ignore[var-annotated]

    def answer(self, turns: Any, on_text: Any = None, system: str | None = None) -> str:
        self.sent.append(fit_to_context(system or "", list(turns), self.prompt_budget))
        return self.reply


def gold_chunks(settings: Settings) -> dict[str, set[str]]:
    """Each question's own chunk texts (one question text may come from several chunks)."""
    golds: dict[str, set[str]] = {}
    with Store(settings.db_path) as store:
        for row in store.db.execute(
            "SELECT q.text, c.text FROM questions q JOIN chunks c ON c.id = q.chunk_id"
        ):
            golds.setdefault(row[0], set()).add(row[1].strip())
    return golds


def shown_sources(settings: Settings, system: str) -> list[Hit]:
    """The indexed chunks a with-context system prompt shows, in its order."""
    with Store(settings.db_path) as store:
        retriever = Retriever.open(store, settings)
        ids = [row[0] for row in store.db.execute("SELECT chunk_id FROM index_chunks")]
        hits = [hit for cid in ids if (hit := retriever.chunk_hit(cid)) is not None]
    blocks = re.split(r"\n\n(?=\[\d+\] )", system.split("\n\nSources:\n\n", 1)[1])
    found = []
    for n, block in enumerate(blocks, 1):
        found.append(
            next(h for h in hits if format_context([h]).split("\n", 1)[1] == block.split("\n", 1)[1])
        )
        assert block.startswith(f"[{n}] ")
    return found


def test_with_context_examples_are_what_the_bot_sends_and_cite_their_own_chunk(
    tmp_path: Path, grounded_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, dataset_style="with-context", negatives_fraction=0)
    summary = built(settings)
    assert summary.dataset is not None and summary.dataset.problems == []

    gold = gold_chunks(settings)
    answered = refused = 0
    for record in records(settings, "train") + records(settings, "validation"):
        system, question, target = (m["content"] for m in record["messages"])
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        sources = shown_sources(settings, system)
        # the prompt is the bot's: its system prompt over these sources, fitted as the bot fits them
        assert system == grounded_system_prompt(settings, sources)
        bot = RecordingAnswerer(settings, target)
        retrieval = Retrieval(question, sources, 1.0, None)
        served = answer_from_retrieval(settings, bot, retrieval, question)
        assert bot.sent == [record["messages"][:2]]
        texts = [hit.text.strip() for hit in sources]
        if is_refusal(record):
            refused += 1
            assert target == refusal_text(settings, question) == served.answer
            assert len(gold[question]) > 1 or not gold[question] & set(texts)  # distractors only
        else:
            answered += 1
            cited = [s.n for s in served.sources]
            assert len(cited) == 1 and f"[{cited[0]}]" in target  # the answer cites one source...
            assert texts[cited[0] - 1] in gold[question]  # ...its own chunk
            assert len(sources) == settings.retrieval.k  # with k - 1 distractors
    share = refused / (answered + refused)
    assert answered + refused >= 40 and 0.1 <= share <= 0.3  # distractor_only_fraction 0.2
    assert summary.dataset.curation[DISTRACTORS_ONLY] == refused


@pytest.mark.parametrize("style", ["closed-book", "with-context"])
def test_both_styles_validate_and_load_in_datasets_and_trl(
    tmp_path: Path, grounded_llm: FakeOpenAI, style: str
) -> None:
    datasets = pytest.importorskip("datasets")
    data_utils = pytest.importorskip("trl.data_utils")
    settings = settings_for(tmp_path, dataset_style=style)
    summary = built(settings)

    assert summary.dataset is not None and summary.dataset.train is not None
    assert summary.dataset.train.errors == [] and summary.dataset.problems == []
    for name in ("train", "validation"):
        path = settings.dataset_path / f"{name}.jsonl"
        loaded = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(loaded) == len(records(settings, name)) > 0
        assert all(data_utils.is_conversational(row) for row in loaded)
        assert loaded.column_names == ["messages"]


def test_a_corpus_too_small_for_distractors_uses_what_it_has_and_says_so(
    tmp_path: Path, grounded_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, dataset_style="with-context", retrieval_k=8, min_examples=1)
    run_ingest(settings, [str(TINY_DOCS)])
    run_index(settings)
    run_generate_questions(settings)
    summary = run_build_dataset(settings)

    assert summary.dataset is not None and summary.dataset.problems == []
    assert any("fewer than retrieval.k = 8 chunks" in note for note in summary.dataset.notes)
    for record in records(settings, "train"):
        assert 1 <= len(shown_sources(settings, record["messages"][0]["content"])) < 8


def test_with_context_needs_chat_messages(tmp_path: Path, grounded_llm: FakeOpenAI) -> None:
    settings = settings_for(tmp_path, dataset_style="with-context", dataset_format="prompt-completion")
    with pytest.raises(ConfigError, match="dataset_format = chat"):
        built(settings)


@pytest.mark.parametrize(
    ("answer", "cited"),
    [
        ("Run the command.", "Run the command [2]."),
        ("First this.\n\nThen that!", "First this [2].\n\nThen that [2]!"),
        ("Do this:\n\n```\nftkit run\n```", "Do this:\n\n```\nftkit run\n```\n\n[2]"),
        ("It works\n\n```\na\n\nb\n```\n\nDone.", "It works [2]\n\n```\na\n\nb\n```\n\nDone [2]."),
    ],
)
def test_cite_closes_each_prose_paragraph(answer: str, cited: str) -> None:
    assert cite(answer, 2) == cited


# --- never pay twice --------------------------------------------------------------------------------------


def test_every_option_on_reruns_free_and_each_switch_asks_only_what_it_affects(
    tmp_path: Path, grounded_llm: FakeOpenAI
) -> None:
    every = {"grounding_judge": True, "paraphrases_per_question": 1, "dedupe_across_chunks": True}
    settings = settings_for(tmp_path, dataset_style="with-context", **every)
    first = built(settings).dataset
    assert first is not None
    first_negatives = [r["messages"][1]["content"] for r in records(settings, "train") if is_refusal(r)]
    sent = len(grounded_llm.requests)

    rerun = run_build_dataset(settings)
    assert len(grounded_llm.requests) == sent and rerun.llm_calls == 0

    closed = settings.model_copy(update={"dataset_style": "closed-book"})  # only rebuilds the files
    assert run_build_dataset(closed).llm_calls == 0 and len(grounded_llm.requests) == sent
    assert "messages" in records(closed, "train")[0] and len(records(closed, "train")[0]["messages"]) == 3

    more = settings.model_copy(update={"negatives_fraction": 0.3})  # asks only for the negatives it adds
    summary = run_build_dataset(more)
    stages = calls_by_stage(more)
    assert summary.llm_calls > 0 and set(stages) <= {STAGE, JUDGE_STAGE}
    assert summary.dataset is not None and summary.dataset.curation["negatives"] > 0
    negatives = [r for r in records(more, "train") + records(more, "validation") if is_refusal(r)]
    n_answered = len(records(more, "train")) + len(records(more, "validation")) - len(negatives)
    # with-context: a distractors-only example is a refusal too, so count the negatives by the summary
    assert summary.dataset.curation["negatives"] > len(first_negatives) or n_answered == 0
    kept = [r["messages"][1]["content"] for r in records(more, "train") if is_refusal(r)]
    assert set(first_negatives) <= set(kept)  # the earlier ones stay, unasked
    judged = "negatives dropped: the judge finds the docs answer it"
    new_candidates = (summary.dataset.curation["negatives"] + summary.dataset.curation[judged]) - (
        first.curation["negatives"] + first.curation[judged]
    )
    assert stages[JUDGE_STAGE] == new_candidates > 0  # one judge call per candidate never judged before
