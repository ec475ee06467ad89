"""Answers from the docs: numbered sources, citations checked against what was retrieved, "I don't know"."""

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.llm.api import Endpoint
from finetune_kit.retrieval.answer import (
    LINK_REMOVED,
    Retrieval,
    answer_from_retrieval,
    check_citations,
    fit_sources,
    format_context,
    grounded_system_prompt,
    refusal_text,
    says_docs_silent,
)
from finetune_kit.retrieval.types import Hit
from finetune_kit.slack.answerer import OpenAIAnswerer, Turn
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply

FOREIGN = "https://totally-real-docs.example.net/rotate_key"


def hit(n: int, text: str | None = None, url: str | None = None) -> Hit:
    """The n-th retrieved chunk of a made-up docs site."""
    return Hit(
        rank=n,
        score=round(1 / (60 + n), 6),
        chunk_id=f"chunk{n}",
        path=f"guides/page{n}.md",
        heading=f"Page {n} > Part {n}",
        url=f"https://docs.acme.dev/page{n}#part-{n}",
        title=f"Page {n}",
        text=text or f"Page {n} says fact number {n}.",
        snippet=f"fact number {n}",
        dense_score=0.7 - n / 100,
        lexical_score=5.0 - n,
        dense_rank=n,
        lexical_rank=n,
    )


FOUR = [hit(n) for n in range(1, 5)]


def retrieval(hits: list[Hit], threshold: float | None = None, relevance: float = 0.69) -> Retrieval:
    return Retrieval("how do I rotate an SDK key?", hits, relevance if hits else None, threshold)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(workspace=tmp_path / "ws", product="Acme Flags")


@pytest.fixture
def answerer_for(
    settings: Settings,
) -> Iterator[Callable[[Callable[[dict], Reply]], tuple[OpenAIAnswerer, FakeOpenAI]]]:
    """An OpenAIAnswerer talking over HTTP to a fake model that answers with `responder`."""
    opened: list[tuple[OpenAIAnswerer, FakeOpenAI]] = []

    def start(responder: Callable[[dict], Reply]) -> tuple[OpenAIAnswerer, FakeOpenAI]:
        fake = FakeOpenAI(responder, api_key=TEST_KEY).__enter__()
        endpoint = Endpoint(base_url=fake.url, api_key=TEST_KEY, model="gpt-4o-mini", identity="fake")
        answerer = OpenAIAnswerer.from_settings(endpoint, settings.model_copy(update={}))
        opened.append((answerer, fake))
        return answerer, fake

    yield start
    for answerer, fake in opened:
        answerer.close()
        fake.__exit__(None, None, None)


# --- the numbered context: one function and one prompt, reused by issue 15's dataset --------------------------


def test_the_context_numbers_each_chunk_with_its_title_heading_url_and_text() -> None:
    assert format_context(FOUR[:2]) == (
        "[1] Page 1 — Page 1 > Part 1\nhttps://docs.acme.dev/page1#part-1\nPage 1 says fact number 1.\n\n"
        "[2] Page 2 — Page 2 > Part 2\nhttps://docs.acme.dev/page2#part-2\nPage 2 says fact number 2."
    )


def test_the_grounded_prompt_names_the_product_and_carries_the_numbered_sources(settings: Settings) -> None:
    prompt = grounded_system_prompt(settings, FOUR[:2])
    assert prompt.startswith("You are a helpful technical support assistant for Acme Flags.")
    assert "like [1] or [2]" in prompt and "I don't know" in prompt
    assert prompt.endswith(format_context(FOUR[:2]))


def test_sources_that_do_not_fit_the_window_are_left_out_and_the_last_one_cut(settings: Settings) -> None:
    long = [hit(n, text=" ".join(f"word{i}" for i in range(400))) for n in range(1, 5)]
    fitted = fit_sources(settings, long, "which word?", False, budget_tokens=1400)
    assert [h.chunk_id for h in fitted] == ["chunk1", "chunk2"]
    assert fitted[0] == long[0] and len(fitted[1].text) < len(long[1].text)
    assert fit_sources(settings, long, "which word?", False, budget_tokens=300)[0].chunk_id == "chunk1"


# --- citations are checked against what was retrieved ------------------------------------------------------


def test_a_citation_of_a_chunk_not_retrieved_is_dropped_and_kept_ones_stay() -> None:
    text, cited = check_citations("Rotate it in the console [2][7]. Then restart [1, 7] or [3-5].", FOUR)
    assert text == "Rotate it in the console [2]. Then restart [1] or [3, 4]."
    assert cited == {1, 2, 3, 4}


def test_a_foreign_url_is_removed_and_a_retrieved_page_counts_as_cited() -> None:
    answer = (
        f"See {FOREIGN}, [the guide]({FOREIGN}/guide) and https://docs.acme.dev/page3. "
        "Also www.evil.example.org/x."
    )
    text, cited = check_citations(answer, FOUR)
    assert text == (f"See {LINK_REMOVED}, the guide and https://docs.acme.dev/page3. Also {LINK_REMOVED}.")
    assert cited == {3}


def test_a_url_written_in_a_retrieved_chunk_is_kept_but_is_not_a_citation() -> None:
    hits = [hit(1, text="Call `curl https://api.acme.dev/v1/flags` with your key.")]
    text, cited = check_citations("Run curl https://api.acme.dev/v1/flags.", hits)
    assert (text, cited) == ("Run curl https://api.acme.dev/v1/flags.", set())


def test_array_indexes_and_markdown_links_are_not_citations() -> None:
    text, cited = check_citations("Use `flags[9]` and items[2].", FOUR)
    assert (text, cited) == ("Use `flags[9]` and items[2].", set())


@pytest.mark.parametrize(
    "answer",
    [
        "I don't know — the docs don't cover this.",
        "I don\u2019t know.",
        "The documentation does not mention baking bread. However, you could try flour [1].",
        "The provided sources do not contain any information about Mars.",
        "Sorry, this is not covered in the docs.",
        "There is no information about that in the sources.",
        "I cannot find that. Bread needs flour and water and an oven and time and patience.",
        "Bread is great. Anyway, I don't know how to bake it.",
        # the bot's own refusals, which a model trained on with-context examples learns to say
        "I found nothing in the documentation of Quillstack that answers “bread”, so I won't guess — ask a person.",
        "The documentation of Quillstack never mentions “salesforce”, so I won't guess.",
    ],
)
def test_the_model_saying_the_docs_are_silent_is_recognised(answer: str) -> None:
    text, cited = check_citations(answer, FOUR)
    assert says_docs_silent(text, cited)


@pytest.mark.parametrize(
    "answer",
    [
        "Rotate the key in Settings > Keys [1].",
        "If the source does not contain a heading, its path is the title [2].",
        "Restart the server; the docs say it reloads keys [1]. I don't know a faster way, but [2] helps.",
    ],
)
def test_an_answer_is_not_mistaken_for_a_refusal(answer: str) -> None:
    text, cited = check_citations(answer, FOUR)
    assert not says_docs_silent(text, cited)


def test_a_refusal_is_one_sentence_naming_what_was_searched(settings: Settings) -> None:
    text = refusal_text(settings, "how   do I bake\nbread?")
    assert text == (
        "I found nothing in the documentation of Acme Flags that answers “how do I bake bread?”, so I won't guess"
        " — try the words the docs would use, or ask a person."
    )
    assert len(refusal_text(settings, "x" * 10_000)) < 300


# --- the answer, through a real answerer over HTTP -------------------------------------------------------------


def test_a_citation_not_retrieved_and_a_pasted_foreign_url_never_become_sources(
    settings: Settings, answerer_for: Callable
) -> None:
    answerer, fake = answerer_for(lambda body: Reply(f"Rotate it under Keys [1] and [7]; details: {FOREIGN}"))
    answer = answer_from_retrieval(settings, answerer, retrieval(FOUR), "how do I rotate an SDK key?")
    assert [s.n for s in answer.sources] == [1]
    assert [s.url for s in answer.sources] == [FOUR[0].url]
    assert "[7]" not in answer.answer and FOREIGN not in answer.answer
    assert answer.answer == f"Rotate it under Keys [1]; details: {LINK_REMOVED}"
    assert (answer.refused, answer.cited_nothing, answer.retrieved) == (False, False, FOUR)
    [body] = fake.requests
    assert body["messages"][0] == {"role": "system", "content": grounded_system_prompt(settings, FOUR)}
    assert body["messages"][1] == {"role": "user", "content": "how do I rotate an SDK key?"}


def test_an_answer_citing_nothing_is_marked(settings: Settings, answerer_for: Callable) -> None:
    answerer, _ = answerer_for(lambda body: Reply("Rotate it under Keys."))
    answer = answer_from_retrieval(settings, answerer, retrieval(FOUR), "how do I rotate an SDK key?")
    assert (answer.answer, answer.sources, answer.cited_nothing, answer.refused) == (
        "Rotate it under Keys.",
        [],
        True,
        False,
    )


def test_below_the_threshold_the_model_is_not_called(settings: Settings, answerer_for: Callable) -> None:
    answerer, fake = answerer_for(lambda body: Reply("Made up [1]."))
    answer = answer_from_retrieval(
        settings, answerer, retrieval(FOUR, threshold=0.8, relevance=0.31), "bread?"
    )
    assert fake.requests == []
    assert answer.refused and answer.sources == [] and answer.retrieved == FOUR
    assert answer.answer == refusal_text(settings, "how do I rotate an SDK key?")


def test_nothing_retrieved_is_refused_without_a_call(settings: Settings, answerer_for: Callable) -> None:
    answerer, fake = answerer_for(lambda body: Reply("Made up [1]."))
    answer = answer_from_retrieval(settings, answerer, retrieval([]), "bread?")
    assert fake.requests == [] and answer.refused


def test_the_model_saying_the_docs_do_not_cover_it_is_the_same_refusal(
    settings: Settings, answerer_for: Callable
) -> None:
    answerer, fake = answerer_for(
        lambda body: Reply("The docs don't cover this. But I think you can call rotate_key() [2] in crypto.")
    )
    answer = answer_from_retrieval(settings, answerer, retrieval(FOUR, threshold=0.5), "how do I rotate?")
    assert len(fake.requests) == 1
    assert answer.refused and answer.sources == []
    assert answer.answer == refusal_text(settings, "how do I rotate an SDK key?")


def test_a_follow_up_sends_the_history_and_the_streamed_text_is_checked_too(
    settings: Settings, answerer_for: Callable
) -> None:
    streamed: list[str] = []
    answerer, fake = answerer_for(lambda body: Reply(f"Yes [2] [9] {FOREIGN}"))
    history = [Turn("user", "how do I rotate a key?"), Turn("assistant", "Under Keys [1].")]
    answer = answer_from_retrieval(
        settings, answerer, retrieval(FOUR), "and for a server key?", history, streamed.append
    )
    assert [m["role"] for m in fake.requests[0]["messages"]] == ["system", "user", "assistant", "user"]
    assert streamed and all(FOREIGN not in text and "[9]" not in text for text in streamed)
    assert answer.answer == f"Yes [2] {LINK_REMOVED}" and [s.n for s in answer.sources] == [2]


def test_the_json_of_an_answer_has_the_documented_fields(settings: Settings, answerer_for: Callable) -> None:
    from finetune_kit.ask import answer_json

    answerer, _ = answerer_for(lambda body: Reply("Under Keys [2]."))
    answer = answer_from_retrieval(settings, answerer, retrieval(FOUR), "how do I rotate an SDK key?")
    body = json.loads(answer_json(answer, "how do I rotate an SDK key?"))
    assert set(body) >= {"answer", "model", "refused", "query", "sources", "retrieved"}
    assert body["sources"] == [
        {
            "n": 2,
            "url": "https://docs.acme.dev/page2#part-2",
            "path": "guides/page2.md",
            "heading": "Page 2 > Part 2",
            "score": FOUR[1].score,
            "title": "Page 2",
            "chunk_id": "chunk2",
        }
    ]
    assert [h["chunk_id"] for h in body["retrieved"]] == ["chunk1", "chunk2", "chunk3", "chunk4"]
    assert "text" not in body["retrieved"][0] and body["retrieved"][0]["snippet"] == "fact number 1"


# --- end to end: ftkit ask on a real index of the sample docs ---------------------------------------------------


def ftkit(workspace: Path, *args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from finetune_kit.cli import app

    result = CliRunner().invoke(app, ["-w", str(workspace), *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample docs ingested and indexed once for this module (indexing embeds every chunk)."""
    workspace = tmp_path_factory.mktemp("sample-index") / "ws"
    for args in (["ingest", str(SAMPLE_DOCS)], ["index"]):
        code, out, err = ftkit(workspace, *args)
        assert code == 0, out + err
    return workspace


@pytest.fixture
def indexed(sample_index: Path, tmp_path: Path, fake_llm: FakeOpenAI) -> Path:
    """A copy of the indexed sample workspace, its model a fake at OPENAI_BASE_URL."""
    workspace = tmp_path / "ws"
    shutil.copytree(sample_index, workspace)
    return workspace


def ask_json(workspace: Path, question: str, *args: str) -> dict:
    code, out, err = ftkit(workspace, "ask", question, "--model", "gpt-4o-mini", "--json", *args)
    assert (code, err) == (0, "[gpt-4o-mini]\n"), out + err
    return json.loads(out)


def test_ask_shows_only_retrieved_cited_sources_when_the_model_cites_7_of_4_and_pastes_a_foreign_url(
    indexed: Path, fake_llm: FakeOpenAI
) -> None:
    fake_llm.responder = lambda body: Reply(f"Rotate it from the dashboard [1] [7]. See {FOREIGN} for more.")
    body = ask_json(indexed, "How do I rotate an SDK key?")
    assert len(body["retrieved"]) == 4 and len(fake_llm.requests) == 1
    assert [source["n"] for source in body["sources"]] == [1]
    assert body["sources"][0]["url"] == body["retrieved"][0]["url"]
    assert body["sources"][0]["chunk_id"] == body["retrieved"][0]["chunk_id"]
    assert body["answer"] == f"Rotate it from the dashboard [1]. See {LINK_REMOVED} for more."
    assert (body["refused"], body["cited_nothing"], body["query"]) == (
        False,
        False,
        "How do I rotate an SDK key?",
    )
    sent = fake_llm.requests[0]["messages"][0]["content"]
    assert "[4] " in sent and "[5] " not in sent  # the model saw four numbered sources


def test_ask_prints_the_answer_then_the_cited_sources(indexed: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.responder = lambda body: Reply("Roll it back from the flag's history [2].")
    code, out, _ = ftkit(indexed, "ask", "How do I roll back a flag change?", "--model", "gpt-4o-mini")
    hits = ask_json(indexed, "How do I roll back a flag change?")["retrieved"]
    second = hits[1]
    heading = f" — {second['heading']}" if second["heading"] and second["heading"] != second["title"] else ""
    assert code == 0
    assert out == (
        "Roll it back from the flag's history [2].\n\nSources:\n"
        f"[2] {second['title']}{heading}  {second['url']}\n"
    )


def test_an_off_topic_question_makes_no_model_call_when_a_threshold_is_set(
    indexed: Path, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_RETRIEVAL_THRESHOLD", "0.3")
    monkeypatch.setenv("FTKIT_RETRIEVAL_REFUSE_UNKNOWN_TERMS", "false")  # the threshold alone
    fake_llm.responder = lambda body: Reply("Here is a recipe [1].")
    body = ask_json(indexed, "What is the best recipe for sourdough bread?")
    assert fake_llm.requests == []
    assert (body["refused"], body["sources"]) == (True, [])
    assert body["answer"].startswith("I found nothing in the documentation of the product that answers")
    assert len(body["retrieved"]) == 4
    assert (
        ask_json(indexed, "How do I roll back a flag change?")["refused"] is False
    )  # the same gate lets it by
    assert len(fake_llm.requests) == 1


def test_a_question_naming_what_the_docs_never_mention_is_refused_without_a_call(
    indexed: Path, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_llm.responder = lambda body: Reply("Connect it in Settings > Integrations [1].")
    body = ask_json(indexed, "How do I connect the flag server to Salesforce?")  # a high cosine: integrations
    assert fake_llm.requests == [] and (body["refused"], body["sources"]) == (True, [])
    assert body["answer"].startswith("The documentation of the product never mentions “salesforce”")
    monkeypatch.setenv("FTKIT_RETRIEVAL_REFUSE_UNKNOWN_TERMS", "false")
    assert ask_json(indexed, "How do I connect the flag server to Salesforce?")["refused"] is False
    assert len(fake_llm.requests) == 1


def test_the_model_saying_the_docs_do_not_cover_it_is_refused(indexed: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.responder = lambda body: Reply(
        "The docs don't cover this, but rotate_key() in crypto [2] works."
    )
    code, out, _ = ftkit(indexed, "ask", "How do I rotate an SDK key?", "--model", "gpt-4o-mini")
    assert code == 0 and out.startswith("I found nothing in the documentation") and "Sources" not in out
    assert len(fake_llm.requests) == 1


def test_an_answer_citing_nothing_says_so(indexed: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.responder = lambda body: Reply("Rotate it from the dashboard.")
    code, out, _ = ftkit(indexed, "ask", "How do I rotate an SDK key?", "--model", "gpt-4o-mini")
    assert (code, out) == (
        0,
        "Rotate it from the dashboard.\n\nSources: this answer cites no source — check it against the docs.\n",
    )


def test_no_rag_asks_the_model_alone(indexed: Path, fake_llm: FakeOpenAI) -> None:
    fake_llm.responder = lambda body: Reply("From memory.")
    body = ask_json(indexed, "How do I rotate an SDK key?", "--no-rag")
    assert (body["answer"], body["sources"], body["retrieved"]) == ("From memory.", [], [])
    assert not fake_llm.requests[0]["messages"][0]["content"].endswith("Sources:")
    assert "[1] " not in fake_llm.requests[0]["messages"][0]["content"]


def test_rag_without_an_index_is_one_line_naming_ftkit_index(tmp_path: Path, fake_llm: FakeOpenAI) -> None:
    code, out, err = ftkit(tmp_path / "ws", "ask", "How?", "--model", "gpt-4o-mini", "--rag")
    assert code == 1 and out == "" and err.count("\n") == 1 and "run `ftkit index`" in err
    assert fake_llm.requests == []
    code, out, err = ftkit(
        tmp_path / "ws", "ask", "How?", "--model", "gpt-4o-mini"
    )  # the default: closed-book
    assert code == 0 and err == "[gpt-4o-mini]\n" and out.strip()
