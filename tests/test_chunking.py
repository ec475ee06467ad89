import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_kit.chunking.markdown import Chunk, ChunkSettings, chunk_markdown
from finetune_kit.errors import ChunkingError
from finetune_kit.tokens import count_tokens

SMALL = ChunkSettings(target_tokens=96, overlap_tokens=16, min_tokens=0)
FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})")


def fences_closed(text: str) -> bool:
    """Whether every fenced code block opened in `text` is closed again."""
    fence = ""
    for line in text.split("\n"):
        mark = line.strip()
        if not fence and (match := FENCE_OPEN.match(line)):
            fence = match[1]
        elif fence and len(mark) >= len(fence) and mark == fence[0] * len(mark):
            fence = ""
    return not fence


def sentences(prefix: str, count: int) -> str:
    return " ".join(f"{prefix} sentence {i} explains one detail." for i in range(count))


def test_defaults() -> None:
    assert ChunkSettings() == ChunkSettings(target_tokens=512, overlap_tokens=64, min_tokens=40)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_tokens": 31}, "target_tokens is 31 but must be at least 32; raise target_tokens."),
        (
            {"target_tokens": 100, "overlap_tokens": 100},
            "overlap_tokens is 100 but must be from 0 to 99 (below target_tokens=100); "
            "set overlap_tokens in that range.",
        ),
        (
            {"overlap_tokens": -1},
            "overlap_tokens is -1 but must be from 0 to 511 (below target_tokens=512); "
            "set overlap_tokens in that range.",
        ),
        (
            {"target_tokens": 100, "min_tokens": 101},
            "min_tokens is 101 but must be from 0 to 100 (at most target_tokens=100); "
            "set min_tokens in that range.",
        ),
        (
            {"min_tokens": -5},
            "min_tokens is -5 but must be from 0 to 512 (at most target_tokens=512); "
            "set min_tokens in that range.",
        ),
    ],
)
def test_invalid_settings_name_the_fix(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ChunkingError) as error:
        ChunkSettings(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("text", ["", "   \n\n\t\n", "---\ntitle: only front matter\n---\n"])
def test_empty_documents_yield_no_chunks(text: str) -> None:
    assert chunk_markdown(text) == []


def test_tiny_document_yields_one_chunk() -> None:
    assert chunk_markdown("Hello.") == [Chunk(seq=0, heading_path=(), text="Hello.", n_tokens=2)]


def test_document_of_only_headings_keeps_them() -> None:
    assert chunk_markdown("# Only\n## Headings\n") == [
        Chunk(seq=0, heading_path=("Only", "Headings"), text="# Only\n## Headings", n_tokens=6)
    ]


def test_empty_leaf_heading_is_kept_and_empty_parent_lives_in_breadcrumbs() -> None:
    text = "# Guide\n\n## Setup\n\n### Coming soon\n\n### Linux\n\nUse apt.\n"
    assert chunk_markdown(text) == [
        Chunk(
            seq=0,
            heading_path=("Guide", "Setup"),
            text="# Guide\n## Setup\n### Coming soon\n\n### Linux\n\nUse apt.",
            n_tokens=16,
        )
    ]


def test_heading_path_and_breadcrumb() -> None:
    text = "# Install ##\n\nIntro.\n\n## On Linux\n\n### Debian\n\nUse apt.\n"
    assert chunk_markdown(text, ChunkSettings(min_tokens=0)) == [
        Chunk(seq=0, heading_path=("Install",), text="# Install\n\nIntro.", n_tokens=5),
        Chunk(
            seq=1,
            heading_path=("Install", "On Linux", "Debian"),
            text="# Install\n## On Linux\n### Debian\n\nUse apt.",
            n_tokens=13,
        ),
    ]


def test_setext_headings_and_thematic_breaks() -> None:
    text = "Title\nsecond line\n===\n\nbody\n\nSub\n---\n\n- item\n---\n\ntext\n\n---\n\nmore\n"
    assert chunk_markdown(text, ChunkSettings(min_tokens=0)) == [
        Chunk(seq=0, heading_path=("Title second line",), text="# Title second line\n\nbody", n_tokens=6),
        Chunk(
            seq=1,
            heading_path=("Title second line", "Sub"),
            text="# Title second line\n## Sub\n\n- item\n---\n\ntext\n\n---\n\nmore",
            n_tokens=16,
        ),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("---\ntitle: x\n# not: a heading\n---\n# A\n\nbody\n", "# A\n\nbody"),
        ("+++\ntitle = 'x'\n+++\n# A\n\nbody\n", "# A\n\nbody"),
        ("---\ntitle: x\n...\n# A\n\nbody\n", "# A\n\nbody"),
        ("\ufeff---\r\ntitle: x\r\n---\r\n# A\r\n\r\nbody\r\n", "# A\n\nbody"),
    ],
)
def test_front_matter_is_dropped(text: str, expected: str) -> None:
    assert [c.text for c in chunk_markdown(text)] == [expected]


def test_unclosed_front_matter_is_kept_as_text() -> None:
    assert [c.text for c in chunk_markdown("---\nnot closed\n\nText\n")] == ["---\nnot closed\n\nText"]


def test_headings_inside_fences_are_code() -> None:
    text = (
        "# A\n\n````md\n```\n# inside\n```\n````\n\n   ~~~\n## also inside\n   ~~~\n\n"
        "```py\n# unterminated\n## heading?\n"
    )
    [chunk] = chunk_markdown(text)
    assert chunk.heading_path == ("A",)
    assert chunk.text == (
        "# A\n\n````md\n```\n# inside\n```\n````\n\n   ~~~\n## also inside\n   ~~~\n\n"
        "```py\n# unterminated\n## heading?\n```"
    )
    assert fences_closed(chunk.text)


def test_backtick_line_with_backticks_in_info_is_not_a_fence() -> None:
    text = "# A\n\n```inline``` code\n\n## B\n\nbody\n"
    assert [c.heading_path for c in chunk_markdown(text, ChunkSettings(min_tokens=0))] == [("A",), ("A", "B")]


def test_small_sections_pack_within_a_chapter_only() -> None:
    linux, mac, usage = sentences("Linux", 3), sentences("Mac", 3), sentences("Usage", 3)
    text = f"# Guide\n\n## Setup\n\n### Linux\n\n{linux}\n\n### Mac\n\n{mac}\n\n## Usage\n\n{usage}\n"
    assert chunk_markdown(text, ChunkSettings(target_tokens=200, overlap_tokens=0, min_tokens=0)) == [
        Chunk(
            seq=0,
            heading_path=("Guide", "Setup"),
            text=f"# Guide\n## Setup\n### Linux\n\n{linux}\n\n### Mac\n\n{mac}",
            n_tokens=60,
        ),
        Chunk(seq=1, heading_path=("Guide", "Usage"), text=f"# Guide\n## Usage\n\n{usage}", n_tokens=30),
    ]


def test_repeated_titles_are_distinct_sections() -> None:
    text = "## API\n\n### Example\n\nfoo()\n\n### Example\n\nbar()\n"
    assert [(c.heading_path, c.text) for c in chunk_markdown(text)] == [
        (("API",), "## API\n### Example\n\nfoo()\n\n### Example\n\nbar()"),
    ]


def test_sections_that_do_not_fit_together_stay_apart() -> None:
    text = f"# Guide\n\n### Linux\n\n{sentences('Linux', 3)}\n\n### Mac\n\n{sentences('Mac', 3)}\n"
    chunks = chunk_markdown(text, ChunkSettings(target_tokens=50, overlap_tokens=0, min_tokens=0))
    assert [c.heading_path for c in chunks] == [("Guide", "Linux"), ("Guide", "Mac")]


def test_small_chunks_merge_under_the_same_top_heading() -> None:
    text = "# Guide\n\n## Setup\n\nRun it.\n\n## Usage\n\nCall it.\n\n# Reference\n\nSee API.\n"
    merged = chunk_markdown(text, ChunkSettings(target_tokens=64, overlap_tokens=8, min_tokens=20))
    apart = chunk_markdown(text, ChunkSettings(target_tokens=64, overlap_tokens=8, min_tokens=0))
    assert [(c.heading_path, c.text) for c in merged] == [
        (("Guide",), "# Guide\n## Setup\n\nRun it.\n\n## Usage\n\nCall it."),
        (("Reference",), "# Reference\n\nSee API."),
    ]
    assert [c.heading_path for c in apart] == [("Guide", "Setup"), ("Guide", "Usage"), ("Reference",)]


def test_small_preamble_merges_into_the_first_section() -> None:
    text = "Badges here.\n\n# Project\n\nWhat it does.\n"
    assert chunk_markdown(text) == [
        Chunk(seq=0, heading_path=(), text="Badges here.\n\n# Project\n\nWhat it does.", n_tokens=11)
    ]


def test_code_blocks_are_never_cut() -> None:
    blocks = ["```python\n" + "\n".join(f"step_{b}_{i}()" for i in range(6)) + "\n```" for b in range(5)]
    parts = [f"{sentences(f'Part {b}', 2)}\n\n{block}" for b, block in enumerate(blocks)]
    text = "# Code\n\n" + "\n\n".join(parts)
    chunks = chunk_markdown(text, SMALL)
    assert len(chunks) > 1
    assert all(fences_closed(c.text) for c in chunks)
    assert [sum(block in c.text for c in chunks) for block in blocks] == [1, 1, 1, 1, 1]


def test_oversized_code_block_is_split_with_reopened_fences() -> None:
    lines = [f"value_{i} = compute({i})" for i in range(60)]
    text = "# Big\n\n```python title=big.py\n" + "\n".join(lines) + "\n```\n"
    chunks = chunk_markdown(text, SMALL)
    assert len(chunks) > 2
    assert all(c.text.startswith("# Big\n\n```python title=big.py\n") for c in chunks)
    assert all(c.text.endswith("\n```") and c.n_tokens <= 96 for c in chunks)
    inner = [line for c in chunks for line in c.text.split("\n")[3:-1]]
    assert inner == lines


def test_oversized_unterminated_code_block_is_closed_in_every_piece() -> None:
    text = "# Big\n\n  ~~~~sh\n" + "\n".join(f"echo {i} > /tmp/file_{i}" for i in range(60))
    chunks = chunk_markdown(text, SMALL)
    assert len(chunks) > 2
    assert all(c.text.startswith("# Big\n\n  ~~~~sh\n") and c.text.endswith("\n  ~~~~") for c in chunks)


def test_table_is_kept_whole() -> None:
    table = "| Flag | Meaning |\n| --- | --- |\n" + "\n".join(f"| --opt-{i} | sets {i} |" for i in range(5))
    text = f"# Flags\n\n{sentences('Intro', 5)}\n\n{table}\n\n{sentences('Outro', 5)}\n"
    chunks = chunk_markdown(text, SMALL)
    assert len(chunks) > 1
    assert [table in c.text for c in chunks].count(True) == 1


def test_oversized_table_repeats_its_header() -> None:
    header = "| Flag | Meaning |\n| --- | --- |"
    rows = [f"| --opt-{i} | sets option number {i} |" for i in range(30)]
    chunks = chunk_markdown("# Flags\n\n" + header + "\n" + "\n".join(rows) + "\n", SMALL)
    assert len(chunks) > 2
    assert all(c.text.startswith(f"# Flags\n\n{header}\n") for c in chunks)
    assert [line for c in chunks for line in c.text.split("\n")[4:]] == rows


def test_list_is_split_between_items() -> None:
    items = [f"- Item {i} says: {sentences(f'Item {i}', 1)}\n  continued detail {i}." for i in range(12)]
    chunks = chunk_markdown("# List\n\n" + "\n".join(items) + "\n", ChunkSettings(96, 0, 0))
    assert len(chunks) > 1
    assert [item for item in items if not any(item in c.text for c in chunks)] == []


def test_long_single_line_paragraph_splits_at_sentences() -> None:
    text = "# Prose\n\n" + sentences("Long", 40) + "\n"
    chunks = chunk_markdown(text, ChunkSettings(target_tokens=64, overlap_tokens=0, min_tokens=0))
    assert len(chunks) > 3
    assert all(c.text.endswith("explains one detail.") and c.n_tokens <= 64 for c in chunks)
    assert " ".join(c.text.removeprefix("# Prose\n\n") for c in chunks) == sentences("Long", 40)


@pytest.mark.parametrize("word", ["word" * 3000, "日本語のテキスト" * 300])
def test_text_without_whitespace_splits_at_token_boundaries(word: str) -> None:
    chunks = chunk_markdown(f"# T\n\n{word}", ChunkSettings(target_tokens=64, overlap_tokens=8, min_tokens=0))
    assert len(chunks) > 10
    assert all(c.n_tokens <= 64 for c in chunks)
    assert "".join(c.text.removeprefix("# T\n\n") for c in chunks) == word


def test_overlap_repeats_trailing_lines_within_the_budget() -> None:
    paragraphs = ["\n".join(f"Paragraph {p} line {i} has a few words." for i in range(4)) for p in range(8)]
    text = "# Prose\n\n" + "\n\n".join(paragraphs) + "\n"
    chunks = chunk_markdown(text, ChunkSettings(target_tokens=96, overlap_tokens=24, min_tokens=0))
    assert len(chunks) > 3
    bodies = [c.text.removeprefix("# Prose\n\n").split("\n") for c in chunks]
    for previous, current in itertools.pairwise(bodies):
        repeated = max(n for n in range(len(current) + 1) if previous[len(previous) - n :] == current[:n])
        assert 0 < count_tokens("\n".join(current[:repeated])) <= 24
        assert current[0] != ""


def test_zero_overlap_repeats_nothing() -> None:
    paragraphs = ["\n".join(f"Paragraph {p} line {i} has a few words." for i in range(4)) for p in range(8)]
    text = "# Prose\n\n" + "\n\n".join(paragraphs) + "\n"
    chunks = chunk_markdown(text, ChunkSettings(target_tokens=96, overlap_tokens=0, min_tokens=0))
    lines = [line for c in chunks for line in c.text.split("\n") if line.startswith("Paragraph")]
    assert lines == [line for p in paragraphs for line in p.split("\n")]


def test_chunks_are_deterministic_and_counted_exactly() -> None:
    text = "# A\n\n" + "\n\n".join(sentences(f"Block {i}", 3) for i in range(30))
    first = chunk_markdown(text, SMALL)
    assert first == chunk_markdown(text, SMALL)
    assert [c.seq for c in first] == list(range(len(first)))
    assert all(c.n_tokens == count_tokens(c.text) <= 96 for c in first)


WORD = st.text(alphabet="abcdefghij.,", min_size=1, max_size=8)
LINE = st.lists(WORD, min_size=1, max_size=6).map(" ".join).map(lambda line: "w" + line)
PARAGRAPH = st.lists(LINE, min_size=1, max_size=6).map("\n".join)
LIST = st.lists(LINE, min_size=1, max_size=6).map(lambda lines: "\n".join(f"- {line}" for line in lines))
CODE_LINE = st.one_of(LINE, st.just("# not a heading"), st.just(""), st.just("    indented()"))
CODE = st.tuples(st.sampled_from(["```", "~~~", "````"]), st.lists(CODE_LINE, max_size=40)).map(
    lambda parts: "\n".join([parts[0] + "py", *parts[1], parts[0]])
)
HEADING = st.tuples(st.integers(1, 4), st.lists(WORD, min_size=1, max_size=2).map(" ".join)).map(
    lambda parts: "#" * parts[0] + " H" + parts[1]
)
BLOCK = st.one_of(PARAGRAPH, LIST, CODE, HEADING)


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(BLOCK, max_size=30),
    target=st.integers(96, 300),
    overlap=st.integers(0, 40),
    minimum=st.integers(0, 60),
)
def test_no_body_line_is_lost(blocks: list[str], target: int, overlap: int, minimum: int) -> None:
    chunk_settings = ChunkSettings(target_tokens=target, overlap_tokens=overlap, min_tokens=minimum)
    text = "---\nfront: matter\n---\n" + "\n\n".join(blocks)
    chunks = chunk_markdown(text, chunk_settings)
    chunk_lines = [set(c.text.split("\n")) for c in chunks]
    body = [line for block in blocks for line in block.split("\n") if line.strip()]
    assert [line for line in body if not any(line in lines for lines in chunk_lines)] == []
    assert all(fences_closed(c.text) and c.n_tokens == count_tokens(c.text) <= target for c in chunks)
    assert all("front: matter" not in c.text for c in chunks)
    assert chunks == chunk_markdown(text, chunk_settings)
