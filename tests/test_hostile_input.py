"""Hostile corpora: deep nesting, links out of the source, floods of tiny sections, bad sources among good ones."""

import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import SourceError
from finetune_kit.sources.files import OUTSIDE_SOURCE
from finetune_kit.sources.text import to_text
from finetune_kit.stages.estimate import estimate_generation
from finetune_kit.stages.ingest import IngestReport, ingest
from finetune_kit.store import Store
from finetune_kit.tokens import count_tokens
from tests.conftest import SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI
from tests.test_source_website import Site, crawl, html, serve, site  # noqa: F401 (fixtures)

GOOD = "# Install\n\nQuillstack installs with pip and keeps its settings in one TOML file per project.\n"
SECRET = "aws_secret_access_key = AKIA-NEVER-READ-THIS"


def _ingest(settings: Settings, *specs: str) -> tuple[IngestReport, dict[str, str]]:
    """Ingest `specs`; return the report and the active documents' text by path."""
    with Store(settings.db_path) as store:
        report = ingest(store, settings, list(specs))
        rows = store.db.execute("SELECT path, text FROM documents WHERE status = 'active'")
        return report, {path: text for path, text in rows}


def ftkit(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--workspace", "ws", *args])
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------- 1. deep nesting


def _indented(line: str, step: int) -> Callable[[int], str]:
    return lambda depth: (
        "".join(" " * (step * i) + line + "\n\n" for i in range(depth)) + " " * (step * depth) + "x\n"
    )


NESTED: dict[str, tuple[str, Callable[[int], str]]] = {
    "html-divs": ("deep.html", lambda d: "<div>" * d + "<p>x</p>" + "</div>" * d),
    "html-lists": ("deep.html", lambda d: "<ul><li>" * d + "x" + "</li></ul>" * d),
    "html-tables": ("deep.html", lambda d: "<table><tr><td>" * d + "x" + "</td></tr></table>" * d),
    "html-quotes": ("deep.html", lambda d: "<blockquote>" * d + "x" + "</blockquote>" * d),
    "html-unclosed": ("deep.htm", lambda d: "<div><span>" * d + "x"),
    "rst-bullets": ("deep.rst", lambda d: "- " * d + "x\n"),
    "rst-enumerated": ("deep.rst", lambda d: "1. " * d + "x\n"),
    "rst-quotes": ("deep.rst", _indented("Quoted paragraph.", 1)),
    "rst-directives": ("deep.rst", _indented(".. note::", 3)),
    "rst-lists": ("deep.rst", _indented("- item", 2)),
    "md-quotes": ("deep.md", lambda d: ">" * d + " x\n"),
    "md-lists": ("deep.md", lambda d: "".join("  " * i + "- x\n" for i in range(d))),
    "md-fences": ("deep.md", lambda d: "".join("`" * (3 + d - i) + "\n" for i in range(d)) + "x\n"),
    "mdx-jsx": (
        "deep.mdx",
        lambda d: "".join(" " * i + "<Box>\n" for i in range(d)) + "x\n" + "</Box>\n" * d,
    ),
    "python-defs": (
        "deep.py",
        lambda d: "".join(" " * i + f"def f{i}():\n" for i in range(d)) + " " * d + "pass\n",
    ),
    "js-blocks": (
        "deep.js",
        lambda d: (
            "".join(" " * i + "function f() {\n" for i in range(d))
            + "".join(" " * i + "}\n" for i in range(d))
        ),
    ),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(NESTED)), depth=st.integers(1, 900))
@example(kind="html-divs", depth=600)  # the 7 KB file of the issue
@example(kind="rst-bullets", depth=300)
@example(kind="js-blocks", depth=600)
def test_a_deeply_nested_file_is_skipped_with_its_reason_and_the_good_files_are_kept(
    kind: str, depth: int
) -> None:
    name, build = NESTED[kind]
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        (docs / "good.md").write_text(GOOD)
        (docs / name).write_text(build(depth))
        report, documents = _ingest(load_settings(workspace=Path(tmp) / "ws", include_code=True), str(docs))
    skipped = dict(report.skipped)
    assert "good.md" in documents
    assert (name in documents) != (name in skipped)
    if name in skipped:
        assert "nested" in skipped[name] and "--exclude" in skipped[name]


def test_the_issues_600_divs_are_skipped_by_the_cli_with_the_depth_and_limit(
    runner: CliRunner, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text(GOOD)
    (docs / "deep.html").write_text("<div>" * 600 + "x" + "</div>" * 600)
    code, out, err = ftkit(runner, "ingest", str(docs))
    assert (code, err) == (0, "")
    assert "1 new documents" in out
    assert (
        "  deep.html: HTML nested 600 tags deep (the limit is 128) — flatten it, or leave it out with --exclude"
        in out
    )


@contextmanager
def _stack_left(frames: int) -> Iterator[None]:
    """Leave only `frames` frames of recursion room, so a converter meets RecursionError below the depth checks."""
    limit = sys.getrecursionlimit()
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    sys.setrecursionlimit(depth + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize(("name", "source"), [("a.html", "<div>" * 100 + "x"), ("a.rst", "- " * 40 + "x\n")])
def test_a_recursion_error_in_a_converter_is_a_skip_reason_not_a_crash(name: str, source: str) -> None:
    with _stack_left(120):
        reason = to_text(name, source.encode(), include_code=False)
    assert reason == "nested too deeply to convert — flatten it, or leave it out with --exclude"


def test_a_deeply_nested_page_is_skipped_and_the_crawl_goes_on(site: Site, tmp_path: Path) -> None:  # noqa: F811
    site.put(
        "/guide/config.html", b"<html><body>" + b"<div>" * 600 + b"x" + b"</div>" * 600 + b"</body></html>"
    )
    report, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert sorted(documents) == ["/", "/guide/install.html"]
    assert (
        "/guide/config.html",
        "HTML nested 602 tags deep (the limit is 128) — flatten it, or leave it out with --exclude",
    ) in report.skipped


# ---------------------------------------------------------------- 2. links out of the source


def _hostile_tree(root: Path) -> Path:
    """docs/ with links leading out (a file, a chain of links, a folder) and links that stay inside."""
    home = root / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials.md").write_text(f"# AWS\n\n{SECRET}\n")
    (home / "notes.md").write_text(f"# Notes\n\n{SECRET}\n")
    docs = root / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "install.md").write_text(GOOD)
    (docs / "creds.md").symlink_to(home / ".aws" / "credentials.md")  # absolute
    (docs / "hop.md").symlink_to("../home/.aws/credentials.md")  # relative
    (docs / "chain.md").symlink_to("guide/step.md")  # inside, then out
    (docs / "guide" / "step.md").symlink_to("../hop.md")
    (docs / "home").symlink_to(home, target_is_directory=True)  # a folder outside
    (docs / "alias").symlink_to("guide", target_is_directory=True)  # a folder inside
    (docs / "same.md").symlink_to("guide/install.md")  # a file inside: read
    (docs / "loop.md").symlink_to("loop.md")
    return docs


def _assert_nothing_outside_was_read(report: IngestReport, documents: dict[str, str]) -> None:
    assert sorted(documents) == ["guide/install.md", "same.md"]
    assert all(SECRET not in text for text in documents.values())
    assert dict(report.skipped) == {
        "creds.md": OUTSIDE_SOURCE,
        "hop.md": OUTSIDE_SOURCE,
        "chain.md": OUTSIDE_SOURCE,
        "guide/step.md": OUTSIDE_SOURCE,
        "home": OUTSIDE_SOURCE,
        "alias": "a symbolic link to a folder of this source — not followed (its files are read where they lie)",
        "loop.md": "unreadable: a loop of symbolic links",
    }


def test_links_that_lead_outside_a_folder_are_skipped_and_never_read(tmp_path: Path) -> None:
    docs = _hostile_tree(tmp_path)
    report, documents = _ingest(load_settings(workspace=tmp_path / "ws"), str(docs))
    _assert_nothing_outside_was_read(report, documents)


def _git(cwd: Path, *args: str) -> None:
    config = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *config, *args], cwd=cwd, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("read", ["in place", "cloned"])
def test_committed_links_that_lead_outside_a_repository_are_skipped(tmp_path: Path, read: str) -> None:
    docs = _hostile_tree(tmp_path)
    _git(docs, "init", "--quiet")
    _git(docs, "add", "-A")
    _git(docs, "commit", "--quiet", "-m", "docs and links")
    spec = str(docs) if read == "in place" else docs.as_uri()
    settings = load_settings(workspace=tmp_path / "ws", include=["*.md", "home", "alias"])
    report, documents = _ingest(settings, spec)
    assert sorted(documents) == ["guide/install.md", "same.md"]
    assert all(SECRET not in text for text in documents.values())
    skipped = dict(report.skipped)
    assert {
        path: skipped[path] for path in ("creds.md", "hop.md", "chain.md", "guide/step.md", "home")
    } == dict.fromkeys(("creds.md", "hop.md", "chain.md", "guide/step.md", "home"), OUTSIDE_SOURCE)
    assert skipped["alias"] == "not a regular file"


@settings(max_examples=40, deadline=None)
@given(hops=st.lists(st.booleans(), min_size=1, max_size=5), end_outside=st.booleans())
def test_a_chain_of_links_is_read_only_when_it_ends_inside_the_source(
    hops: list[bool], end_outside: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs, outside = root / "docs", root / "outside"
        docs.mkdir()
        outside.mkdir()
        (docs / "good.md").write_text(GOOD)
        target = (outside if end_outside else docs) / "target.md"
        target.write_text(f"# Target\n\n{SECRET}\n")
        link = target
        for n, hop_outside in enumerate(hops):  # each hop is a link in docs/ or outside/ to the previous one
            hop = (outside if hop_outside else docs) / f"hop{n}.md"
            hop.symlink_to(os.path.relpath(link, hop.parent))
            link = hop
        (docs / "entry.md").symlink_to(os.path.relpath(link, docs))
        report, documents = _ingest(load_settings(workspace=root / "ws"), str(docs))
    assert ("entry.md" in documents) == (not end_outside)
    if end_outside:
        assert all(SECRET not in text for text in documents.values())
        assert dict(report.skipped)["entry.md"] == OUTSIDE_SOURCE


def test_a_page_that_redirects_to_a_file_or_another_host_is_skipped(
    serve: Callable[[Site], Site],  # noqa: F811
    site: Site,  # noqa: F811
    tmp_path: Path,
) -> None:
    other = serve(Site())
    other.put("/stolen.html", html("Elsewhere", "Not ours."))
    site.put("/", html("Home", "Welcome.", ["/guide/install.html", "/local.html", "/away.html"]))
    site.redirects["/local.html"] = "file:///etc/passwd"
    site.redirects["/away.html"] = other.url + "/stolen.html"
    report, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert sorted(documents) == ["/", "/guide/config.html", "/guide/install.html"]
    skipped = dict(report.skipped)
    assert skipped["/local.html"] == "redirects to another site (file:///etc/passwd)"
    assert skipped["/away.html"] == f"redirects to another site ({other.url}/stolen.html)"
    assert other.log == []


def test_a_start_url_that_redirects_to_a_file_url_of_the_same_host_is_refused(
    serve: Callable[[Site], Site],  # noqa: F811
    tmp_path: Path,
) -> None:
    entry = serve(Site())
    entry.redirects["/"] = "file://127.0.0.1/etc/passwd"  # same host name: not a site that moved
    with pytest.raises(SourceError) as raised:
        crawl(load_settings(workspace=tmp_path / "ws"), entry.url + "/")
    assert str(raised.value).startswith(
        f"{entry.url}/: redirects to another site (file://127.0.0.1/etc/passwd)"
    )


# ---------------------------------------------------------------- 5. floods of tiny sections


def _one_line_sections(n: int) -> str:
    return "".join(f"# Setting {i}\n\nThe widget {i} is set with --w{i}.\n\n" for i in range(n))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(200, 3000),
    level=st.sampled_from(["# ", "## ", "setext"]),
    target=st.sampled_from([128, 256, 512]),
)
def test_tiny_sections_are_merged_so_calls_stay_near_the_corpus_size(n: int, level: str, target: int) -> None:
    if level == "setext":
        text = "".join(f"Setting {i}\n=======\n\nThe widget {i} is set with --w{i}.\n\n" for i in range(n))
    else:
        text = "".join(f"{level}Setting {i}\n\nThe widget {i} is set with --w{i}.\n\n" for i in range(n))
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        (docs / "flags.md").write_text(text)
        # the grounding judge's calls (one per answer) are estimated in test_grounding.py
        settings_ = load_settings(
            workspace=Path(tmp) / "ws",
            chunk_target_tokens=target,
            chunk_overlap_tokens=16,
            grounding_judge=False,
        )
        with Store(settings_.db_path) as store:
            ingest(store, settings_, [str(docs)])
            calls = sum(e.calls for e in estimate_generation(store, settings_))
    per_chunk = 1 + settings_.questions_per_chunk  # one question call, then one answer per question
    # chunks at least 80 % full: the calls of the work itself, within a quarter of the fewest possible
    # (rounded up to whole chunks: 7.8 chunks' worth of text needs 8)
    assert calls <= per_chunk * math.ceil(1.25 * count_tokens(text) / target)


def test_ten_thousand_one_line_sections_cost_calls_in_proportion_to_their_text(
    runner: CliRunner, fake_llm: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the grounding judge's calls (one per answer) are estimated in test_grounding.py
    monkeypatch.setenv("FTKIT_GROUNDING_JUDGE", "false")
    docs = tmp_path / "docs"
    docs.mkdir()
    text = _one_line_sections(10_000)
    (docs / "flags.md").write_text(text)
    code, out, err = ftkit(runner, "run", str(docs), "--dry-run")
    assert code == 0, err
    by_size = dict(re.findall(r"│ chunks (\S+) +│ +([\d,]+) │", out))
    estimated = int(re.search(r"│ total +│ +([\d,]+) │", out)[1].replace(",", ""))
    assert list(by_size) == ["257–512"] and int(by_size["257–512"].replace(",", "")) == estimated
    code, out, err = ftkit(runner, "run", str(docs))
    assert code == 0, err
    chunks_wanted = count_tokens(text) / 512
    assert len(fake_llm.requests) <= estimated <= 1.25 * 4 * chunks_wanted  # the issue's run made 40,008
    assert "0 duplicates" in out


def test_a_chunk_too_small_for_questions_costs_nothing_and_says_why(
    runner: CliRunner, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    (docs / "changelog").mkdir(parents=True)
    for name in (SAMPLE_DOCS / "guides").iterdir():
        (docs / name.name).write_text(name.read_text())
    (docs / "changelog" / "tiny.md").write_text("# Fixed\n\nTypo.\n")
    code, out, err = ftkit(runner, "run", str(docs), "--dry-run")
    assert code == 0, err
    assert "│ chunks under 10    │     0 │" in out
    code, out, err = ftkit(runner, "run", str(docs), "--min-examples", "1")
    assert code == 0, err
    assert not any("Typo." in str(body) for body in fake_llm.requests)
    with Store(Path("ws/state.db")) as store:
        reasons = store.db.execute(
            "SELECT c.text, q.reason FROM question_sets q JOIN chunks c ON c.id = q.chunk_id WHERE q.n_accepted = 0"
        ).fetchall()
    assert [tuple(row) for row in reasons] == [
        ("# Fixed\n\nTypo.", "too small for questions (under 10 tokens; see chunk_min_tokens)")
    ]


# ---------------------------------------------------------------- 6. one bad source among good ones


def _bad_source(root: Path) -> Path:
    bad = root / "bad"
    bad.mkdir()
    (bad / "blank.md").write_text("\n\n")
    (bad / "binary.md").write_bytes(b"\x00\x01\x02")
    return bad


def test_a_bad_source_is_reported_and_the_good_ones_are_run(
    runner: CliRunner, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    bad = _bad_source(tmp_path)
    code, out, err = ftkit(runner, "run", str(SAMPLE_DOCS), str(bad))
    assert code == 0, err
    assert fake_llm.requests  # the good source's chunks were asked about
    assert Path("ws/dataset/train.jsonl").is_file()
    message = f"{bad}: no usable documents (2 files skipped: 1 binary file, 1 empty after conversion) — check --include/--exclude"
    assert "source left out" in out
    code, out, err = ftkit(runner, "ingest", str(SAMPLE_DOCS), str(bad))
    assert code == 0, err
    assert f"Left out 1 source(s) that gave no usable document:\n  {message}" in out


def test_only_bad_sources_is_still_an_error(runner: CliRunner, tmp_path: Path) -> None:
    bad = _bad_source(tmp_path)
    assert ftkit(runner, "ingest", str(bad))[0] == 1
    code, _, err = ftkit(runner, "ingest", str(bad), str(tmp_path / "missing"))
    assert code == 1
    assert "no usable documents" in err and "no such file or directory" in err


# ---------------------------------------------------------------- 7. the per-file size limit and chunk size errors


def test_max_file_bytes_is_a_setting(runner: CliRunner, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "small.md").write_text(GOOD)
    (docs / "big.md").write_text(GOOD + "More text. " * 200)
    Path("ftkit.toml").write_text("max_file_bytes = 1024\n")
    code, out, err = ftkit(runner, "ingest", str(docs))
    assert (code, err) == (0, "")
    assert "  big.md: larger than 1 KB (raise max_file_bytes to read it)" in out
    Path("ftkit.toml").write_text("max_file_bytes = 4096\n")
    code, out, err = ftkit(runner, "ingest", str(docs))
    assert code == 0 and "1 new documents" in out and "Skipped" not in out


def test_a_chunk_size_too_small_names_the_flag_and_the_setting(runner: CliRunner, tmp_path: Path) -> None:
    code, _, err = ftkit(runner, "ingest", str(SAMPLE_DOCS), "--chunk-tokens", "0")
    assert code == 1
    assert err.strip() == (
        "Error: invalid setting 'chunk_target_tokens': Value error, must be at least 32, not 0 (--chunk-tokens sets"
        " it; the default is 512) — fix it in ftkit.toml, FTKIT_CHUNK_TARGET_TOKENS or the matching flag"
    )
