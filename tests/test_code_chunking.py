"""The code chunker: definitions as chunks with exact line ranges, splits without loss, anchors, stable ids."""

import sqlite3
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_kit.chunking.code import (
    CodeChunk,
    chunk_code,
    chunk_code_document,
    line_permalink,
    unwrap_code_document,
)
from finetune_kit.chunking.markdown import ChunkSettings
from finetune_kit.config import load_settings
from finetune_kit.sources.text import code_to_markdown
from finetune_kit.stages import ingest as ingest_stage
from finetune_kit.stages.ingest import chunker_key, ingest
from finetune_kit.store import Store
from finetune_kit.tokens import count_tokens

SMALL = ChunkSettings(target_tokens=96, overlap_tokens=0, min_tokens=20)
APP = '''\
"""Storage for widgets."""

import json
from pathlib import Path

LIMIT = 100


# Saving is atomic: a temporary file is renamed over the target.
@retry(times=3)
@log_calls
def save(widgets: list[dict], path: Path) -> int:
    """Write widgets to path as JSON and return how many were written."""
    if len(widgets) > LIMIT:
        raise ValueError(f"at most {LIMIT} widgets, got {len(widgets)}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(widgets))
    tmp.replace(path)
    return len(widgets)


class Store:
    """Widgets kept in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.widgets: list[dict] = []

    @property
    def count(self) -> int:
        """How many widgets the store holds right now, saved or not."""
        return len(self.widgets)

    class Backup:
        """A copy of the store's file, taken before every save so a bad write can be undone."""

        def restore(self, store: "Store") -> None:
            store.path.write_text(self.path.read_text())
'''


def code_lines(chunk: CodeChunk) -> list[str]:
    """The code inside a chunk's fence."""
    return chunk.text.split("\n\n", 1)[1].split("\n")[1:-1]


def spans(chunks: list[CodeChunk]) -> list[tuple[tuple[str, ...], int, int]]:
    return [(c.heading_path, c.start_line, c.end_line) for c in chunks]


def assert_lossless(source: str, chunks: list[CodeChunk], target: int) -> None:
    """Chunks are in order, do not overlap, hold exactly their source lines and every non-blank line, and fit."""
    lines = source.split("\n")
    covered: list[int] = []
    pieces: dict[int, str] = {}
    for chunk in chunks:
        assert chunk.start_line <= chunk.end_line
        assert chunk.n_tokens == count_tokens(chunk.text) <= target
        if chunk.start_line == chunk.end_line and code_lines(chunk) != [lines[chunk.start_line - 1]]:
            pieces[chunk.start_line] = pieces.get(chunk.start_line, "") + "\n".join(code_lines(chunk))
        else:
            assert code_lines(chunk) == lines[chunk.start_line - 1 : chunk.end_line]
        if not covered or covered[-1] != chunk.start_line:
            covered += range(chunk.start_line, chunk.end_line + 1)
    assert covered == sorted(set(covered))
    assert all(pieces[n] == lines[n - 1] for n in pieces)
    assert [n for n, line in enumerate(lines, 1) if line.strip() and n not in covered] == []
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_python_definitions_are_chunks_with_exact_line_ranges() -> None:
    chunks = chunk_code(APP, "src/app.py", "python", ChunkSettings(target_tokens=512, min_tokens=40))

    assert spans(chunks) == [
        (("src/app.py",), 1, 19),  # the small module header joins the first definition
        (("src/app.py", "class Store"), 22, 38),
    ]
    assert chunks[0].text.startswith('# src/app.py\n\n```python\n"""Storage for widgets."""')
    assert chunks[1].text.endswith("            store.path.write_text(self.path.read_text())\n```")
    assert_lossless(APP, chunks, 512)


def test_decorators_and_the_comment_above_belong_to_the_function() -> None:
    chunks = chunk_code(APP, "src/app.py", "python", ChunkSettings(target_tokens=160, min_tokens=20))

    assert spans(chunks) == [
        (("src/app.py",), 1, 6),
        (("src/app.py", "def save"), 9, 19),
        (("src/app.py", "class Store"), 22, 38),
    ]
    assert code_lines(chunks[1])[:4] == [
        "# Saving is atomic: a temporary file is renamed over the target.",
        "@retry(times=3)",
        "@log_calls",
        "def save(widgets: list[dict], path: Path) -> int:",
    ]
    assert_lossless(APP, chunks, 160)


def test_a_class_bigger_than_the_target_is_split_at_its_methods_and_nested_classes() -> None:
    chunks = chunk_code(
        APP, "src/app.py", "python", ChunkSettings(target_tokens=64, overlap_tokens=0, min_tokens=20)
    )

    assert spans(chunks)[-4:] == [
        (("src/app.py", "class Store"), 22, 27),  # header, docstring and the small __init__ packed together
        (("src/app.py", "class Store", "def count"), 29, 32),
        (("src/app.py", "class Store", "class Backup"), 34, 35),
        (("src/app.py", "class Store", "class Backup", "def restore"), 37, 38),
    ]
    assert chunks[-1].text.startswith(
        "# src/app.py > class Store > class Backup > def restore\n\n```python\n        def restore("
    )


def test_a_huge_function_is_split_at_statements_without_losing_a_line() -> None:
    body = "\n".join(f"    total += compute_step_{i}(values, factor={i})" for i in range(120))
    source = f"def huge(values):\n    total = 0\n{body}\n    return total\n"

    chunks = chunk_code(source, "huge.py", "python", SMALL)

    assert len(chunks) > 10
    assert {c.heading_path for c in chunks} == {("huge.py", "def huge")}
    assert_lossless(source, chunks, SMALL.target_tokens)


def test_a_huge_block_without_structure_is_cut_at_blank_lines_first() -> None:
    paragraph = "\n".join(f"    step_{i}()" for i in range(12))
    source = "def f():\n    if True:\n" + "\n\n".join(textwrap.indent(paragraph, "    ") for _ in range(6))

    chunks = chunk_code(source, "f.py", "python", SMALL)

    assert all(c.text.split("\n")[3].strip() != "" for c in chunks)  # no piece starts with a blank line
    assert_lossless(source, chunks, SMALL.target_tokens)


def test_one_line_longer_than_the_target_is_cut_into_token_pieces() -> None:
    source = "DATA = '" + "abcdefgh" * 300 + "'\n\ndef f():\n    return DATA\n"

    chunks = chunk_code(source, "blob.py", "python", SMALL)

    assert [c.start_line for c in chunks if c.end_line == 1] == [1] * (len(chunks) - 1)
    assert_lossless(source, chunks, SMALL.target_tokens)


def test_small_definitions_are_packed_together_up_to_the_target() -> None:
    source = "\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(6)) + "\n"

    chunks = chunk_code(
        source, "small.py", "python", ChunkSettings(target_tokens=64, overlap_tokens=0, min_tokens=40)
    )

    assert spans(chunks) == [(("small.py",), 1, 11), (("small.py",), 13, 17)]
    assert_lossless(source, chunks, 64)


def test_statements_sharing_a_line_and_one_line_definitions_stay_whole() -> None:
    source = "import os; import sys\nclass A: pass\ndef f(): return 1\n"

    chunks = chunk_code(
        source, "one.py", "python", ChunkSettings(target_tokens=64, overlap_tokens=0, min_tokens=0)
    )

    assert spans(chunks) == [
        (("one.py",), 1, 1),
        (("one.py", "class A"), 2, 2),
        (("one.py", "def f"), 3, 3),
    ]


@pytest.mark.parametrize("source", ["", "\n\n  \n", "# only a comment\n"])
def test_empty_and_comment_only_files(source: str) -> None:
    chunks = chunk_code(source, "e.py", "python")
    assert [(c.start_line, c.end_line) for c in chunks] == ([(1, 1)] if "#" in source else [])


GO = """\
package store

import "errors"

// ErrEmpty is returned for an empty item.
var ErrEmpty = errors.New("empty item")

// Store keeps items in memory, in the order they were saved.
type Store struct {
	items []string
}

// Save stores an item and returns how many items the store holds.
func (s *Store) Save(item string) (int, error) {
	if item == "" {
		return 0, ErrEmpty
	}
	s.items = append(s.items, item)
	return len(s.items), nil
}
"""
JAVA = """\
package demo;

/** Greets people by name, politely and with their title when one is known. */
public class Greeter {
    private final String name;

    public Greeter(String name) {
        this.name = name;
    }

    @Override
    public String toString() {
        return "Greeter(" + name + ") with a longer body so that it is not tiny";
    }
}
"""
JS = """\
import { render } from "./render.js";

export class Widget {
  constructor(name) {
    this.name = name;
  }
}

export const makeWidget = async (name) => {
  const widget = new Widget(name);
  await render(widget);
  return widget;
};
"""


@pytest.mark.parametrize(
    ("path", "language", "source", "expected"),
    [
        (
            "store.go",
            "go",
            GO,
            [
                (("store.go",), 1, 6),
                (("store.go", "type Store"), 8, 11),
                (("store.go", "func Save"), 13, 20),
            ],
        ),
        (
            "Greeter.java",
            "java",
            JAVA,
            [
                (("Greeter.java",), 1, 1),
                (("Greeter.java", "class Greeter"), 3, 9),
                (("Greeter.java", "class Greeter", "toString()"), 11, 15),
            ],
        ),
        (
            "app.js",
            "javascript",
            JS,
            [(("app.js",), 1, 7), (("app.js", "function makeWidget"), 9, 13)],
        ),
    ],
)
def test_other_languages_are_split_by_indentation_and_named(
    path: str, language: str, source: str, expected: list[tuple[tuple[str, ...], int, int]]
) -> None:
    target = 96 if language == "java" else 512
    chunks = chunk_code(source, path, language, ChunkSettings(target_tokens=target, min_tokens=20))

    assert spans(chunks) == expected
    assert chunks[-1].text.startswith(f"# {' > '.join(expected[-1][0])}\n\n```{language}\n")
    assert_lossless(source, chunks, target)


def test_python_that_does_not_parse_falls_back_to_indentation() -> None:
    source = "print 'python 2'\n\ndef old(x):\n    print x\n    return x * 2 + old_helper(x, 'and a longer tail')\n"

    chunks = chunk_code(
        source, "old.py", "python", ChunkSettings(target_tokens=64, overlap_tokens=0, min_tokens=0)
    )

    assert spans(chunks) == [(("old.py",), 1, 1), (("old.py", "def old"), 3, 5)]


def test_a_code_document_is_unwrapped_to_its_source_lines() -> None:
    wrapped = code_to_markdown("src/app.py", APP.rstrip("\n"), "python")

    assert unwrap_code_document(wrapped) == ("python", APP.rstrip("\n"))
    assert chunk_code_document(wrapped, "src/app.py") == chunk_code(APP, "src/app.py", "python")
    assert unwrap_code_document("# Title\n\nJust prose.") is None


@pytest.mark.parametrize(
    ("url", "start", "end", "expected"),
    [
        (
            "https://github.com/acme/w/blob/abc/src/app.py",
            10,
            42,
            "https://github.com/acme/w/blob/abc/src/app.py#L10-L42",
        ),
        (
            "https://github.com/acme/w/blob/abc/src/app.py",
            7,
            7,
            "https://github.com/acme/w/blob/abc/src/app.py#L7",
        ),
        (
            "https://gitlab.com/g/s/w/-/blob/abc/app.py",
            10,
            42,
            "https://gitlab.com/g/s/w/-/blob/abc/app.py#L10-42",
        ),
        ("https://gitlab.com/g/w/-/blob/abc/app.py", 3, 3, "https://gitlab.com/g/w/-/blob/abc/app.py#L3"),
        (
            "https://bitbucket.org/a/w/src/abc/app.py",
            10,
            42,
            "https://bitbucket.org/a/w/src/abc/app.py#lines-10:42",
        ),
        (
            "https://bitbucket.org/a/w/src/abc/app.py",
            5,
            5,
            "https://bitbucket.org/a/w/src/abc/app.py#lines-5",
        ),
        ("file:///work/src/app.py", 10, 42, "file:///work/src/app.py#L10-L42"),
        ("file:///repo/app.py#commit=abc", 10, 42, "file:///repo/app.py#commit=abc&L10-L42"),
    ],
)
def test_line_permalinks_use_each_hosts_anchor(url: str, start: int, end: int, expected: str) -> None:
    assert line_permalink(url, start, end) == expected


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def chunk_rows(db: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    rows = db.execute("SELECT heading_path, id, source_url FROM chunks WHERE status = 'active'").fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def chunks_by_id(db: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    rows = db.execute("SELECT id, heading_path, source_url FROM chunks WHERE status = 'active'").fetchall()
    return {row[0]: (row[1], row[2].rsplit("#", 1)[1]) for row in rows}


def test_ingested_code_chunks_link_to_their_lines_at_the_commit(tmp_path: Path) -> None:
    repo = write(tmp_path / "repo", {"src/app.py": APP, "README.md": "# Widgets\n\nStore widgets."})
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://github.com/acme/widgets.git"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "code"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    settings = load_settings(workspace=tmp_path / "ws", include_code=True)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(repo)])
        rows = chunk_rows(store.db)
        doc_urls = dict(store.db.execute("SELECT path, source_url FROM documents").fetchall())
    base = f"https://github.com/acme/widgets/blob/{head.stdout.strip()}"
    assert doc_urls["src/app.py"] == f"{base}/src/app.py"
    assert rows['["src/app.py"]'][1] == f"{base}/src/app.py#L1-L19"
    assert rows['["src/app.py", "class Store"]'][1] == f"{base}/src/app.py#L22-L38"
    assert rows['["Widgets"]'][1] == f"{base}/README.md"


def test_a_function_whose_text_did_not_change_keeps_its_chunk_id(tmp_path: Path) -> None:
    code = write(tmp_path / "code", {"app.py": APP})
    settings = load_settings(
        workspace=tmp_path / "ws", include_code=True, chunk_target_tokens=96, chunk_min_tokens=20
    )
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(code)])
        before = chunks_by_id(store.db)
        edited = APP.replace(
            "    tmp.replace(path)\n", "    tmp.replace(path)\n    path.chmod(0o600)\n    log(path)\n"
        )
        (code / "app.py").write_text(edited)
        report = ingest(store, settings, [str(code)])
        after = chunks_by_id(store.db)
    save = '["app.py", "def save"]'
    assert (report.documents_new, report.documents_retired) == (1, 1)
    kept = {chunk_id: heading for chunk_id, (heading, _) in before.items() if heading != save}
    assert {chunk_id: after[chunk_id][0] for chunk_id in kept} == kept  # same ids, so their questions stay
    assert [(before[i][1], after[i][1]) for i in kept if "def count" in kept[i]] == [("L29-L32", "L31-L34")]
    assert [anchor for heading, anchor in after.values() if heading == save] == ["L9-L13", "L14-L21"]


def test_a_new_code_chunker_version_rechunks_only_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = write(tmp_path / "docs", {"app.py": APP, "guide.md": "# Guide\n\nRead me."})
    settings = load_settings(workspace=tmp_path / "ws", include_code=True)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)])
        monkeypatch.setattr(ingest_stage, "CODE_CHUNKER_VERSION", 999)
        report = ingest(store, settings, [str(docs)])
    assert (report.documents_rechunked, report.documents_unchanged) == (1, 1)
    assert chunker_key(ChunkSettings(), "code").endswith(":code999")
    assert chunker_key(ChunkSettings()) == "k1:512:64:40"


NAMES = st.sampled_from(["alpha", "beta", "gamma", "load", "save", "run"])
STATEMENT = st.sampled_from(
    [
        "x = compute(x, factor=2)",
        "return x",
        "values.append(x)  # keep it",
        "",
        "# a comment line",
        "print(f'{x} and {y}')",
        "total = sum(v * v for v in values if v > threshold_of_some_kind)",
        "data = '" + "z" * 600 + "'",
    ]
)


def _function(name: str, body: list[str], decorated: bool, indent: str) -> str:
    lines = ([f"{indent}@decorate"] if decorated else []) + [f"{indent}def {name}(x):"]
    lines += [f"{indent}    {line}" if line else "" for line in body] or [f"{indent}    pass"]
    return "\n".join(lines)


FUNCTION = st.builds(_function, NAMES, st.lists(STATEMENT, max_size=25), st.booleans(), st.just(""))
CLASS = st.builds(
    lambda name, methods: f"class {name.title()}:\n" + "\n\n".join(methods),
    NAMES,
    st.lists(
        st.builds(_function, NAMES, st.lists(STATEMENT, max_size=12), st.booleans(), st.just("    ")),
        min_size=1,
        max_size=5,
    ),
)
TOP = st.one_of(FUNCTION, CLASS, st.sampled_from(["import os", "LIMIT = 3", "# section", "if x:\n    run()"]))


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(st.tuples(TOP, st.sampled_from(["\n", "\n\n", "\n\n\n"])), max_size=12),
    target=st.integers(64, 300),
    minimum=st.integers(0, 60),
    language=st.sampled_from(["python", "", "go"]),
)
def test_no_line_is_lost_and_chunks_fit(
    items: list[tuple[str, str]], target: int, minimum: int, language: str
) -> None:
    source = "".join(item + gap for item, gap in items)
    chunk_settings = ChunkSettings(target_tokens=target, overlap_tokens=0, min_tokens=min(minimum, target))
    chunks = chunk_code(source, "pkg/mod.py", language, chunk_settings)
    assert_lossless(source, chunks, target)
    assert chunks == chunk_code(source, "pkg/mod.py", language, chunk_settings)
