"""The source registry: which kind reads a corpus argument, in the order of precedence ingest always had."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from finetune_kit.config import load_settings
from finetune_kit.sources import ReadContext, SourceDocument, SourceIdentity, SourceItem, SourceKind, registry
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store


@pytest.fixture
def restore_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kinds a test registers leave with it."""
    monkeypatch.setattr(registry, "_kinds", list(registry.kinds()))


def _git_repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def test_the_built_in_kinds_in_their_order() -> None:
    kinds = registry.kinds()
    assert [kind.name for kind in kinds] == ["airtable", "git", "website", "slack-export", "local"]
    assert all(isinstance(kind, SourceKind) for kind in kinds)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("airtable:appABC123/Docs", "airtable"),
        ("airtable:https://github.com/acme/handbook", "airtable"),  # the prefix wins over any URL after it
        ("https://github.com/acme/handbook", "git"),  # a git host's page is cloned, not crawled
        ("https://gitlab.com/acme/handbook/", "git"),
        ("https://example.com/acme/handbook.git", "git"),
        ("git@github.com:acme/handbook.git", "git"),
        ("ssh://git.example.com/handbook", "git"),
        ("https://docs.example.com/sitemap.xml", "website"),
        ("HTTP://docs.example.com/", "website"),
        ("https://docs.example.com/export.zip", "website"),  # a URL is fetched, never opened as a local zip
        ("missing.zip", "local"),  # a zip that is not there is a missing file, not an export
        ("docs", "local"),
    ],
)
def test_which_kind_claims_a_spec(spec: str, kind: str) -> None:
    assert registry.kind_for(spec).name == kind


def test_local_paths_by_precedence(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    zipped_repo = _git_repo(tmp_path / "repo.zip")  # a folder, even one named .zip, is no export
    export = tmp_path / "export.zip"
    zipfile.ZipFile(export, "w").close()
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n")
    specs = [repo, zipped_repo, export, folder, folder / "a.md", repo / "README.md"]
    assert [registry.kind_for(str(spec)).name for spec in specs] == [
        "git",
        "git",
        "slack-export",
        "local",
        "local",
        "local",
    ]
    assert [registry.kind_for(str(spec)).identity(str(spec)).kind for spec in specs[3:5]] == [
        "directory",
        "file",
    ]


@pytest.mark.parametrize(
    (
        "spec",
        "source_id",
    ),  # the ids ftkit gave these sources before the registry: workspaces keep their state
    [
        ("airtable:appABC123/Docs", "s1:c388dd4466a4933d"),
        ("airtable:appABC123/Docs/", "s1:c388dd4466a4933d"),
        ("https://github.com/acme/handbook", "s1:9a3a2e0b1c6aecc1"),
        ("git@github.com:acme/handbook.git", "s1:16775c66af93a62e"),
        ("https://docs.example.com/sitemap.xml", "s1:a12ebb33e281a163"),
    ],
)
def test_source_ids_are_stable(spec: str, source_id: str) -> None:
    assert registry.kind_for(spec).identity(spec).id == source_id


def test_a_local_path_has_one_id_however_it_is_spelt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path)
    ids = {registry.kind_for(spec).identity(spec).id for spec in ["docs", "./docs/", str(tmp_path / "docs")]}
    assert len(ids) == 1


class NotesSource:
    """A kind a test adds: `notes:TITLE` is one document."""

    name = "notes"

    def claims(self, spec: str) -> bool:
        return spec.startswith("notes:")

    def identity(self, spec: str) -> SourceIdentity:
        return SourceIdentity("notes", spec.removeprefix("notes:"))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        title = spec.removeprefix("notes:")
        return [
            SourceDocument(
                f"{title}.md", f"notes://{title}", f"# {title}\n\nWhat we decided today.\n", "markdown"
            )
        ]


@pytest.mark.usefixtures("restore_registry")
def test_a_registered_kind_is_ingested(tmp_path: Path) -> None:
    registry.register(NotesSource())
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        report = ingest(store, settings, ["notes:standup"])
        source = store.db.execute("SELECT id, spec, kind FROM sources").fetchone()
        document = store.db.execute("SELECT path, source_url FROM documents").fetchone()
    assert report.sources == 1 and report.documents_new == 1 and report.chunks_new == 1
    assert tuple(source) == (SourceIdentity("notes", "standup").id, "notes:standup", "notes")
    assert tuple(document) == ("standup.md", "notes://standup")
    assert registry.kind_for("docs").name == "local"  # the catch-all stays last


@pytest.mark.usefixtures("restore_registry")
def test_a_kind_registered_before_another_takes_precedence_over_it() -> None:
    class GitHubIssues(NotesSource):
        name = "github-issues"

        def claims(self, spec: str) -> bool:
            return spec.startswith("https://github.com/") and "/issues" in spec

    registry.register(GitHubIssues(), before="git")
    assert registry.kind_for("https://github.com/acme/handbook/issues").name == "github-issues"
    assert registry.kind_for("https://github.com/acme/handbook").name == "git"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(GitHubIssues())


def test_ingesting_a_folder_loads_no_airtable_client(tmp_path: Path) -> None:
    """pyairtable (a second to import) loads only when an Airtable table is opened."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\nSome text about the product.\n")
    script = (
        "import sys\n"
        "from finetune_kit.config import load_settings\n"
        "from finetune_kit.stages.ingest import ingest\n"
        "from finetune_kit.store import Store\n"
        f"settings = load_settings(workspace={str(tmp_path / 'ws')!r})\n"
        "with Store(settings.db_path) as store:\n"
        f"    ingest(store, settings, [{str(tmp_path / 'docs')!r}])\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'pyairtable'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
