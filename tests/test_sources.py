"""Corpus sources: file conversion, directory walking and git repositories (all local, no network)."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from finetune_kit.errors import SourceError
from finetune_kit.sources import SkippedFile, SourceDocument, SourceIter
from finetune_kit.sources.files import iter_directory, matches_glob
from finetune_kit.sources.git import is_git_spec, iter_git, parse_remote
from finetune_kit.sources.text import to_text

# ---------------------------------------------------------------- to_text: formats


def test_markdown_keeps_text_and_normalises_newlines_and_trailing_space() -> None:
    raw = b"\xef\xbb\xbf# Title\r\n\r\nBody line   \r\nnext\rlast\t\n\n\n"
    assert to_text("guide.md", raw, False) == ("# Title\n\nBody line\nnext\nlast", "markdown")


@pytest.mark.parametrize("name", ["a.md", "a.markdown", "A.MD"])
def test_markdown_extensions(name: str) -> None:
    assert to_text(name, b"# Hi\n", False) == ("# Hi", "markdown")


def test_markdown_front_matter_title_becomes_heading_when_body_has_none() -> None:
    raw = b'---\ntitle: "Getting started"\nsidebar_position: 2\n---\n\nWelcome.\n'
    assert to_text("intro.md", raw, False) == ("# Getting started\n\nWelcome.", "markdown")


def test_markdown_front_matter_is_dropped_when_body_has_a_heading() -> None:
    raw = b"---\ntitle: Ignored\n---\n# Real title\n\nText.\n"
    assert to_text("intro.md", raw, False) == ("# Real title\n\nText.", "markdown")


def test_markdown_starting_with_a_thematic_break_is_not_front_matter() -> None:
    raw = b"---\n\nAbove the line.\n\n---\n"
    assert to_text("a.md", raw, False) == ("---\n\nAbove the line.\n\n---", "markdown")


def test_mdx_drops_imports_exports_and_jsx_lines_but_keeps_markdown_and_code() -> None:
    raw = b"""import Tabs from '@theme/Tabs';
import {
  TabItem,
} from '@theme/TabItem';
export const meta = {
  author: 'me',
};

# Install

<Tabs>
<TabItem value="pip" label="pip">

```bash
import this stays
<Tabs>
```

</TabItem>
<Admonition
  type="note">
Inside a component.
</Admonition>
<Badge text="new" />
{/* a JSX comment */}
</Tabs>

Text with <b>inline</b> html stays.
"""
    expected = (
        "# Install\n\n```bash\nimport this stays\n<Tabs>\n```\n\nInside a component.\n\n"
        "Text with <b>inline</b> html stays."
    )
    assert to_text("docs/install.mdx", raw, False) == (expected, "markdown")


RST_GUIDE = b"""\
=====
Guide
=====

Intro with :ref:`the install page <install>`, :py:func:`~pkg.run` and ``code``.

Install
=======

Run this::

    pip install widget

.. code-block:: python
   :linenos:
   :caption: example.py

   import widget

Options
-------

- first
- second

.. note:: Restart afterwards.

.. toctree::

   other

Usage
=====

See `the site <https://example.com>`_.
"""


def test_rst_titles_become_headings_by_nesting_level_and_code_is_fenced() -> None:
    expected = """\
# Guide

Intro with the install page, `pkg.run` and `code`.

## Install

Run this:

```
pip install widget
```

```python
import widget
```

### Options

- first
- second

> **Note:** Restart afterwards.

## Usage

See [the site](https://example.com)."""
    assert to_text("guide.rst", RST_GUIDE, False) == (expected, "rst")


def test_rst_tables_admonitions_and_definition_lists() -> None:
    raw = b"""\
.. list-table:: Limits
   :header-rows: 1

   * - Name
     - Value
   * - size
     - 5 MB

.. warning::

   - first
   - second

term
   Its definition.

>>> 1 + 1
2
"""
    expected = """\
**Limits**

| Name | Value |
| --- | --- |
| size | 5 MB |

> **Warning:**
>
> - first
> - second

**term**
Its definition.

```python
>>> 1 + 1
2
```"""
    assert to_text("limits.rst", raw, False) == (expected, "rst")


def test_broken_rst_converts_without_writing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    raw = (
        b"Title\n=\n\n.. unknown-directive::\n\n   body\n\n"
        b"*unclosed emphasis and :bad:`role\n\n.. include:: /etc/passwd\n"
    )
    assert to_text("broken.rst", raw, False) == ("Title\n=\n\n*unclosed emphasis and :bad:`role", "rst")
    assert capfd.readouterr() == ("", "")


def test_html_drops_chrome_and_fences_code_with_its_language() -> None:
    raw = b"""<html><head><title>T</title><style>p {}</style><script>alert(1)</script></head><body>
<nav><a href="/">Home</a></nav>
<h1>Install<a class="headerlink" href="#install">\xc2\xb6</a></h1>
<p>Use <code>snake_case</code> names.</p>
<div class="highlight-python"><div class="highlight"><pre><span class="k">def</span> f(a_b):
    return a*b
</pre></div></div>
<h2>Shell</h2>
<pre><code class="language-bash">pip install widget
</code></pre>
<footer>Copyright</footer></body></html>"""
    expected = (
        "# Install\n\nUse `snake_case` names.\n\n```python\ndef f(a_b):\n    return a*b\n```\n\n"
        "## Shell\n\n```bash\npip install widget\n```"
    )
    assert to_text("site/install.html", raw, False) == (expected, "html")


def test_html_prefers_the_main_element() -> None:
    raw = b"<body><div class='sidebar'>Menu</div><main><h2>Only this</h2></main></body>"
    assert to_text("page.htm", raw, False) == ("## Only this", "html")


def test_text_file() -> None:
    assert to_text("NOTES.txt", b"plain\r\ntext  \n", False) == ("plain\ntext", "text")


def test_code_file_is_a_fenced_block_under_its_path_when_code_is_included() -> None:
    assert to_text("src/app.py", b"print('hi')\n", True) == (
        "# src/app.py\n\n```python\nprint('hi')\n```",
        "code",
    )


def test_code_fence_grows_when_the_code_contains_backticks() -> None:
    assert to_text("x.sh", b"echo ```\n", True) == ("# x.sh\n\n````bash\necho ```\n````", "code")


# ---------------------------------------------------------------- to_text: skip reasons


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("app.py", b"print(1)\n", "code file (include it with --include '*.py' or --code)"),
        ("app.ts", b"let x = 1\n", "code file (include it with --include '*.ts' or --code)"),
        ("logo.xyz", b"anything", "unknown file type '.xyz'"),
        ("Makefile", b"all:\n", "unknown file type (no extension)"),
        ("page.md", b"# Title\x00\x01\x02", "binary file"),
        ("page.md", "café".encode("latin-1"), "not valid UTF-8 text"),
        ("page.md", b"  \n\n\t\n", "empty after conversion"),
        ("page.html", b"<script>var x = 1;</script><style>p {}</style>", "empty after conversion"),
        ("page.mdx", b"import X from 'x'\n<X />\n", "empty after conversion"),
    ],
)
def test_skip_reasons(name: str, raw: bytes, reason: str) -> None:
    assert to_text(name, raw, False) == reason


def test_nul_byte_after_the_first_8_kib_is_not_binary() -> None:
    raw = b"a" * 8192 + b"\x00"
    assert to_text("big.txt", raw, False) == ("a" * 8192 + "\x00", "text")


# ---------------------------------------------------------------- directories


def _documents(items: SourceIter) -> list[SourceDocument]:
    """Collect items, failing if any file was skipped."""
    collected = list(items)
    assert all(isinstance(item, SourceDocument) for item in collected), collected
    return [item for item in collected if isinstance(item, SourceDocument)]


def _write(root: Path, files: dict[str, str | bytes]) -> None:
    """Create files (text or bytes) under root, with parent dirs."""
    for relpath, content in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


DOCS_TREE: dict[str, str | bytes] = {
    "README.md": "# Readme\n",
    "docs/z.rst": "Zed\n===\n",
    "docs/a/intro.mdx": "import X from 'x'\n\n# Intro\n",
    "docs/page.html": "<h1>Page</h1>",
    "docs/notes.txt": "notes\n",
    "docs/logo.png": b"\x89PNG\x00",
    "docs/conf.py": "project = 'x'\n",
    "docs/.hidden.md": "# hidden\n",
    ".git/config.md": "# git internals\n",
    ".venv/lib/x.md": "# venv\n",
    "node_modules/pkg/README.md": "# dependency\n",
    "__pycache__/x.md": "# cache\n",
}


def test_directory_reads_docs_in_sorted_order_and_skips_hidden_and_dependency_dirs(tmp_path: Path) -> None:
    _write(tmp_path, DOCS_TREE)
    items = list(iter_directory(tmp_path, [], []))
    assert [(item.path, item.format) for item in items if isinstance(item, SourceDocument)] == [
        ("README.md", "markdown"),
        ("docs/a/intro.mdx", "markdown"),
        ("docs/notes.txt", "text"),
        ("docs/page.html", "html"),
        ("docs/z.rst", "rst"),
    ]
    assert [item for item in items if isinstance(item, SkippedFile)] == []


def test_directory_documents_default_to_file_uris(tmp_path: Path) -> None:
    _write(tmp_path, {"docs/a b.md": "# Spaces\n"})
    [item] = _documents(iter_directory(tmp_path, [], []))
    assert item == SourceDocument(
        path="docs/a b.md",
        source_url=(tmp_path / "docs" / "a b.md").resolve().as_uri(),
        text="# Spaces",
        format="markdown",
    )
    assert item.source_url.startswith("file:///") and "a%20b.md" in item.source_url


def test_directory_uses_url_for(tmp_path: Path) -> None:
    _write(tmp_path, {"guide/install.md": "# Install\n"})
    [item] = _documents(
        iter_directory(tmp_path, [], [], url_for=lambda path: f"https://docs.example.com/{path}")
    )
    assert item.source_url == "https://docs.example.com/guide/install.md"


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*.rst"], [], ["docs/z.rst"]),
        (["docs/*.txt"], [], ["docs/notes.txt"]),
        (["docs/**/*.mdx"], [], ["docs/a/intro.mdx"]),
        (["**/*.md"], [], ["README.md"]),
        ([], ["docs"], ["README.md"]),
        ([], ["docs/a/**", "*.html"], ["README.md", "docs/notes.txt", "docs/z.rst"]),
        (["docs/**"], ["*.txt", "*.png", "*.py"], ["docs/a/intro.mdx", "docs/page.html", "docs/z.rst"]),
        (["*.py"], [], ["docs/conf.py"]),
    ],
)
def test_include_and_exclude_globs(
    tmp_path: Path, include: list[str], exclude: list[str], expected: list[str]
) -> None:
    _write(tmp_path, DOCS_TREE)
    assert [item.path for item in iter_directory(tmp_path, include, exclude)] == expected


def test_broad_include_reports_code_and_unknown_files_with_their_reasons(tmp_path: Path) -> None:
    _write(tmp_path, DOCS_TREE)
    items = [item for item in iter_directory(tmp_path, ["docs/*"], []) if isinstance(item, SkippedFile)]
    assert items == [
        SkippedFile("docs/conf.py", "code file (include it with --include '*.py' or --code)"),
        SkippedFile("docs/logo.png", "unknown file type '.png'"),
    ]


def test_include_code_adds_code_files_to_the_default_selection(tmp_path: Path) -> None:
    _write(tmp_path, {"guide.md": "# Guide\n", "tool.go": "package main\n", "data.bin": b"\x00"})
    items = _documents(iter_directory(tmp_path, [], [], include_code=True))
    assert [(item.path, item.format) for item in items] == [
        ("guide.md", "markdown"),
        ("tool.go", "code"),
    ]


@pytest.mark.parametrize(
    ("relpath", "pattern", "matches"),
    [
        ("docs/a/b.md", "*.md", True),
        ("docs/a/b.md", "docs/*.md", False),
        ("docs/b.md", "docs/*.md", True),
        ("docs/b.md", "docs/**/*.md", True),
        ("docs/a/b/c.md", "docs/**/*.md", True),
        ("docs/drafts/x.md", "drafts", True),
        ("docs/drafts/x.md", "docs/drafts/", True),
        ("docs/x.md", "./docs/x.md", True),
        ("a/x.md", "[ab]/*.md", True),
        ("c/x.md", "[!ab]/*.md", True),
        ("x.md", "x.m?", True),
        ("x.rst", "*.md", False),
    ],
)
def test_matches_glob(relpath: str, pattern: str, matches: bool) -> None:
    assert matches_glob(relpath, pattern) is matches


def test_missing_root_raises_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SourceError) as caught:
        iter_directory(missing, [], [])
    assert str(caught.value) == f"{missing}: no such file or directory — check the path"


def test_single_file_path_yields_just_that_file(tmp_path: Path) -> None:
    _write(tmp_path, {"one.md": "# One\n", "two.md": "# Two\n", "script.py": "x = 1\n"})
    assert list(iter_directory(tmp_path / "one.md", ["*.rst"], ["*.md"])) == [
        SourceDocument("one.md", (tmp_path / "one.md").resolve().as_uri(), "# One", "markdown")
    ]
    [script] = _documents(iter_directory(tmp_path / "script.py", [], []))
    assert (script.path, script.format) == ("script.py", "code")


def test_files_over_5_mb_are_skipped(tmp_path: Path) -> None:
    _write(tmp_path, {"big.txt": b"a" * (5 * 1024 * 1024 + 1), "ok.txt": b"a" * (5 * 1024 * 1024)})
    items = list(iter_directory(tmp_path, [], []))
    assert items[0] == SkippedFile("big.txt", "larger than 5 MB (raise max_file_bytes to read it)")
    assert isinstance(items[1], SourceDocument) and items[1].path == "ok.txt"


def test_unreadable_file_is_skipped_with_the_os_reason(tmp_path: Path) -> None:
    (tmp_path / "dangling.md").symlink_to(tmp_path / "gone.md")
    assert list(iter_directory(tmp_path, [], [])) == [
        SkippedFile("dangling.md", "unreadable: No such file or directory")
    ]


# ---------------------------------------------------------------- git


def _git(cwd: Path, *args: str) -> str:
    """Run git with a fixed identity and no global config surprises; return stdout."""
    config = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    config += ["-c", "init.defaultBranch=main"]
    result = subprocess.run(["git", *config, *args], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def _make_repo(path: Path, files: dict[str, str | bytes]) -> str:
    """Create a git repository with files committed once; return the commit sha."""
    path.mkdir(parents=True)
    _git(path, "init", "--quiet")
    _write(path, files)
    _git(path, "add", ".")
    _git(path, "commit", "--quiet", "-m", "docs")
    return _git(path, "rev-parse", "HEAD")


REPO_FILES: dict[str, str | bytes] = {
    "README.md": "# Widget\n",
    "docs/install.rst": "Install\n=======\n\nRun it.\n",
    ".github/workflows/ci.md": "# CI\n",
}


def test_local_repo_reads_tracked_files_with_github_permalinks(tmp_path: Path) -> None:
    repo = tmp_path / "widget"
    commit = _make_repo(repo, REPO_FILES)
    _git(repo, "remote", "add", "origin", "https://github.com/acme/widget.git")
    _write(repo, {"untracked.md": "# Not committed\n"})
    items = list(iter_git(str(repo), [], [], tmp_path / "cache"))
    assert items == [
        SourceDocument(
            "README.md", f"https://github.com/acme/widget/blob/{commit}/README.md", "# Widget", "markdown"
        ),
        SourceDocument(
            "docs/install.rst",
            f"https://github.com/acme/widget/blob/{commit}/docs/install.rst",
            "# Install\n\nRun it.",
            "rst",
        ),
    ]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("origin", "permalink"),
    [
        ("git@github.com:acme/widget.git", "https://github.com/acme/widget/blob/{commit}/README.md"),
        (
            "https://gitlab.com/acme/tools/widget.git",
            "https://gitlab.com/acme/tools/widget/-/blob/{commit}/README.md",
        ),
        ("git@bitbucket.org:acme/widget.git", "https://bitbucket.org/acme/widget/src/{commit}/README.md"),
    ],
)
def test_local_repo_permalinks_follow_the_origin_host(tmp_path: Path, origin: str, permalink: str) -> None:
    repo = tmp_path / "widget"
    commit = _make_repo(repo, {"README.md": "# Widget\n"})
    _git(repo, "remote", "add", "origin", origin)
    [item] = _documents(iter_git(str(repo), [], [], tmp_path / "cache"))
    assert item.source_url == permalink.format(commit=commit)


def test_local_repo_without_known_remote_uses_file_uri_and_commit(tmp_path: Path) -> None:
    repo = tmp_path / "widget"
    commit = _make_repo(repo, {"README.md": "# Widget\n"})
    [item] = _documents(iter_git(str(repo), [], [], tmp_path / "cache"))
    assert item.source_url == f"{(repo / 'README.md').resolve().as_uri()}#commit={commit}"


def test_git_respects_include_and_exclude(tmp_path: Path) -> None:
    repo = tmp_path / "widget"
    _make_repo(repo, {**REPO_FILES, "src/app.py": "x = 1\n"})
    assert [item.path for item in iter_git(str(repo), ["*.py", "*.md"], ["README.md"], tmp_path)] == [
        "src/app.py"
    ]


def test_clone_from_file_url_into_cache_and_reuse_it_on_rerun(tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = _make_repo(work, {"README.md": "# Version one\n"})
    bare = tmp_path / "widget.git"
    _git(tmp_path, "clone", "--quiet", "--bare", str(work), str(bare))
    url, cache = bare.as_uri(), tmp_path / "cache"
    checkout = cache / hashlib.sha256(url.encode()).hexdigest()[:16]

    [item] = _documents(iter_git(url, [], [], cache))
    assert item == SourceDocument(
        "README.md",
        f"{(checkout / 'README.md').resolve().as_uri()}#commit={first}",
        "# Version one",
        "markdown",
    )

    _write(work, {"README.md": "# Version two\n"})
    _git(work, "commit", "--quiet", "-am", "update")
    _git(work, "push", "--quiet", str(bare), "main")
    second = _git(work, "rev-parse", "HEAD")
    [item] = _documents(iter_git(url, [], [], cache))
    assert (item.text, item.source_url.endswith(f"#commit={second}")) == ("# Version two", True)
    assert sorted(path.name for path in cache.iterdir()) == [checkout.name]


def test_clone_failure_names_the_url_and_gits_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.git"
    with pytest.raises(SourceError) as caught:
        iter_git(missing.as_uri(), [], [], tmp_path / "cache")
    assert str(caught.value) == (
        f"could not clone {missing.as_uri()}: fatal: '{missing}' does not appear to be a git repository"
        " — check the URL and that you can access it"
    )
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_directory_without_git_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as caught:
        iter_git(str(tmp_path), [], [], tmp_path / "cache")
    assert str(caught.value) == (
        f"{tmp_path}: not a git repository — pass a repository URL or a directory with .git"
    )


def test_is_git_spec(tmp_path: Path) -> None:
    repo, plain, bare = tmp_path / "repo", tmp_path / "plain", tmp_path / "bare.git"
    _make_repo(repo, {"README.md": "# x\n"})
    plain.mkdir()
    _git(tmp_path, "init", "--quiet", "--bare", str(bare))
    assert [is_git_spec(spec) for spec in [str(repo), bare.as_uri(), repo.as_uri()]] == [True, True, True]
    assert [is_git_spec(spec) for spec in [str(plain), plain.as_uri(), str(repo / "README.md")]] == [
        False,
        False,
        False,
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("https://github.com/acme/widget", True),
        ("https://gitlab.com/acme/widget", True),
        ("https://bitbucket.org/acme/widget", True),
        ("https://git.example.com/acme/widget.git", True),
        ("git@github.com:acme/widget.git", True),
        ("ssh://git@example.com/acme/widget", True),
        ("git://example.com/widget", True),
        ("https://docs.example.com/guide", False),
        ("docs", False),
    ],
)
def test_is_git_spec_for_urls(spec: str, expected: bool) -> None:
    assert is_git_spec(spec) is expected


@pytest.mark.parametrize(
    ("remote", "parsed"),
    [
        ("https://github.com/acme/widget.git", ("github.com", "acme/widget")),
        ("https://user:token@github.com/acme/widget/", ("github.com", "acme/widget")),
        ("git@github.com:acme/widget.git", ("github.com", "acme/widget")),
        ("ssh://git@gitlab.com:2222/group/sub/widget.git", ("gitlab.com", "group/sub/widget")),
        ("https://www.GitHub.com/acme/widget", ("github.com", "acme/widget")),
    ],
)
def test_parse_remote(remote: str, parsed: tuple[str, str]) -> None:
    assert parse_remote(remote) == parsed
