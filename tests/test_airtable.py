"""Airtable: the `airtable:BASE/TABLE` source, the models-table sink and `ftkit sources`, over real HTTP."""

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import AirtableError, ConfigError
from finetune_kit.sources import SkippedFile, SourceDocument
from finetune_kit.sources.airtable import read_airtable
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from finetune_kit.training.registry import RegisteredModel, list_models, register_model
from finetune_kit.training.sinks import publish_pending
from tests.fake_airtable import API_KEY, BASE, FakeAirtable, FakeTable

SPEC = f"airtable:{BASE}/Docs"
FAST = {"airtable_requests_per_second": 1000.0, "airtable_backoff_s": 0.0}
TEXT = "Quillstack keeps feature flags in one place and serves them fast. " * 8


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAirtable]:
    """A fake Airtable that ftkit reaches through FTKIT_AIRTABLE_API_URL, with the key exported."""
    with FakeAirtable() as server:
        monkeypatch.setenv("AIRTABLE_API_KEY", API_KEY)
        monkeypatch.setenv("FTKIT_AIRTABLE_API_URL", server.url)
        monkeypatch.setenv("FTKIT_AIRTABLE_REQUESTS_PER_SECOND", "1000")
        monkeypatch.setenv("FTKIT_AIRTABLE_BACKOFF_S", "0")
        yield server


@pytest.fixture
def docs(fake: FakeAirtable) -> FakeTable:
    """A Docs table with three records."""
    table = fake.add_table("Docs", ["Name", "Notes", "Status", "Link"])
    for title in ("Install", "Configure", "Upgrade"):
        fake.add_record(table, {"Name": title, "Notes": f"{title}. {TEXT}", "Status": "Published"})
    return table


def settings_for(tmp_path: Path, **flags: Any) -> Settings:
    return load_settings(workspace=tmp_path / "ws", **flags)


def documents(store: Store) -> dict[str, str]:
    """Active documents: path -> text."""
    rows = store.db.execute("SELECT path, text FROM documents WHERE status = 'active' ORDER BY path")
    return {row[0]: row[1] for row in rows}


def cli(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--workspace", "ws", *args])
    return result.exit_code, result.stdout, result.stderr


# --- the source ------------------------------------------------------------------------------------------


def test_every_page_is_read_and_each_record_is_one_document(fake: FakeAirtable, tmp_path: Path) -> None:
    table = fake.add_table("Docs", ["Name", "Notes"])
    ids = [fake.add_record(table, {"Name": f"Page {n}", "Notes": f"Body {n}."}) for n in range(250)]

    items = read_airtable(SPEC, settings_for(tmp_path))

    gets = fake.calls_to("GET")
    assert [call.query.get("offset", ["/start"])[0].rpartition("/")[2] for call in gets] == [
        "start",
        "100",
        "200",
    ]
    assert [call.query["pageSize"] for call in gets] == [["100"]] * 3
    assert all(call.query["fields[]"] == ["Name", "Notes"] for call in gets)
    assert [item.path for item in items] == ids
    assert items[7] == SourceDocument(
        path=ids[7],
        source_url=f"https://airtable.com/{BASE}/{table.id}/{ids[7]}",  # by ID: a link that opens
        text="# Page 7\n\nBody 7.\n",
        format="markdown",
    )


def test_a_table_given_by_id_links_records_without_reading_the_schema(
    fake: FakeAirtable, docs: FakeTable, tmp_path: Path
) -> None:
    items = read_airtable(f"airtable:{BASE}/{docs.id}", settings_for(tmp_path))
    assert items[0].source_url == f"https://airtable.com/{BASE}/{docs.id}/{docs.records[0]['id']}"  # type: ignore[union-attr]
    assert fake.schema_calls == []


def test_a_token_without_the_schema_scope_still_reads_and_says_why_links_name_the_table(
    fake: FakeAirtable, docs: FakeTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.schema_readable = False
    items = read_airtable(SPEC, settings_for(tmp_path))
    assert items[0].source_url == f"https://airtable.com/{BASE}/Docs/{docs.records[0]['id']}"  # type: ignore[union-attr]
    assert [call.status for call in fake.schema_calls] == [403]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{SPEC}: record links name the table and may not open (")
    assert warning.endswith("— pass the table's ID (tbl…) or give the token the schema.bases:read scope")


def test_body_fields_are_joined_under_headings_and_the_url_field_is_the_link(
    fake: FakeAirtable, tmp_path: Path
) -> None:
    table = fake.add_table("FAQ", ["Title", "Question", "Answer", "Link", "Tags"])
    linked = fake.add_record(
        table,
        {
            "Title": "Reset",
            "Question": "How do I reset?",
            "Answer": "Hold the button.",
            "Link": "https://x.test/r",
        },
    )
    plain = fake.add_record(table, {"Title": "Only an answer", "Answer": "Yes.", "Tags": ["a", "b"]})
    empty = fake.add_record(table, {"Title": "Nothing yet"})
    settings = settings_for(
        tmp_path,
        airtable_title_field="Title",
        airtable_body_fields=["Question", "Answer"],
        airtable_url_field="Link",
    )

    items = read_airtable(f"airtable:{BASE}/FAQ", settings)

    assert fake.calls_to("GET")[0].query["fields[]"] == ["Title", "Question", "Answer", "Link"]
    assert items == [
        SourceDocument(
            linked,
            "https://x.test/r",
            "# Reset\n\n## Question\n\nHow do I reset?\n\n## Answer\n\nHold the button.\n",
            "markdown",
        ),
        SourceDocument(
            plain,
            f"https://airtable.com/{BASE}/{table.id}/{plain}",
            "# Only an answer\n\n## Answer\n\nYes.\n",
            "markdown",
        ),
        SkippedFile(empty, "empty record (no text in Question, Answer)"),
    ]


def test_view_and_formula_select_records(fake: FakeAirtable, docs: FakeTable, tmp_path: Path) -> None:
    draft = fake.add_record(docs, {"Name": "Draft", "Notes": "Not yet.", "Status": "Draft"})
    docs.views["Public"] = [docs.records[0]["id"], docs.records[2]["id"], draft]
    settings = settings_for(tmp_path, airtable_view="Public", airtable_formula="{Status} = 'Published'")

    items = read_airtable(SPEC, settings)

    assert fake.calls_to("GET")[0].query["view"] == ["Public"]
    assert fake.calls_to("GET")[0].query["filterByFormula"] == ["{Status} = 'Published'"]
    assert [item.path for item in items] == [docs.records[0]["id"], docs.records[2]["id"]]


def test_reingest_skips_unchanged_records_versions_edited_ones_and_retires_deleted_ones(
    fake: FakeAirtable, docs: FakeTable, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    with Store(settings.db_path) as store:
        first = ingest(store, settings, [SPEC])
        unchanged = ingest(store, settings, [SPEC])
        docs.records[0]["fields"]["Notes"] = "Install it with pip. " + TEXT
        edited = ingest(store, settings, [SPEC])
        gone = docs.records.pop(1)["id"]
        deleted = ingest(store, settings, [SPEC])
        active = documents(store)
        kinds = store.db.execute("SELECT kind, spec FROM sources").fetchall()

    assert (first.documents_new, first.chunks_new) == (3, 3)
    assert (unchanged.documents_new, unchanged.documents_unchanged, unchanged.chunks_new) == (0, 3, 0)
    assert (edited.documents_new, edited.documents_retired, edited.documents_unchanged) == (1, 1, 2)
    assert (deleted.documents_new, deleted.documents_retired, deleted.chunks_retired) == (0, 1, 1)
    assert gone not in active and active[docs.records[0]["id"]].startswith(
        "# Install\n\nInstall it with pip."
    )
    assert [tuple(row) for row in kinds] == [("airtable", SPEC)]


def test_a_429_waits_the_back_off_and_then_succeeds(
    fake: FakeAirtable, docs: FakeTable, tmp_path: Path
) -> None:
    fake.rate_limited = 2

    items = read_airtable(SPEC, settings_for(tmp_path, airtable_backoff_s=0.3))

    calls = fake.calls_to("GET")
    assert [call.status for call in calls] == [429, 429, 200]
    assert all(later.at - earlier.at >= 0.25 for earlier, later in itertools.pairwise(calls))
    assert len(items) == 3


def test_rate_limiting_that_outlasts_the_retries_is_an_error(
    fake: FakeAirtable, docs: FakeTable, tmp_path: Path
) -> None:
    fake.rate_limited = 10

    with pytest.raises(AirtableError) as caught:
        read_airtable(SPEC, settings_for(tmp_path, airtable_max_retries=2))

    assert str(caught.value) == (
        f"{SPEC}: Airtable still rate-limits after 2 retries — wait a minute and re-run,"
        " or lower airtable_requests_per_second"
    )
    assert [call.status for call in fake.calls_to("GET")] == [429, 429, 429]


def test_requests_are_paced_to_the_per_base_limit(fake: FakeAirtable, tmp_path: Path) -> None:
    table = fake.add_table("Docs", ["Name", "Notes"])
    for n in range(201):
        fake.add_record(table, {"Name": f"Page {n}", "Notes": "Body."})

    read_airtable(SPEC, settings_for(tmp_path, airtable_requests_per_second=5))

    calls = fake.calls_to("GET")
    assert len(calls) == 3
    # 5 requests a second means at least 0.2 s between sends; arrival can be a hair earlier than sending
    assert all(later.at - earlier.at >= 0.18 for earlier, later in itertools.pairwise(calls))


def test_defaults_follow_airtables_published_limits() -> None:
    settings = load_settings()

    assert (settings.airtable.requests_per_second, settings.airtable.backoff_s) == (5.0, 30.0)
    assert (settings.airtable.title_field, settings.airtable.body_fields) == ("Name", ["Notes"])
    assert settings.airtable.api_url == "https://api.airtable.com"


# --- bad input, through the CLI --------------------------------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


TOKENS = "https://airtable.com/create/tokens"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            [SPEC],
            {"AIRTABLE_API_KEY": ""},
            f"{SPEC}: AIRTABLE_API_KEY is not set — create a personal access token with the data.records:read"
            f" scope at {TOKENS} and export it as AIRTABLE_API_KEY",
        ),
        (
            [SPEC],
            {"AIRTABLE_API_KEY": "patWRONG000000000.0123456789abcdef"},
            f"{SPEC}: Airtable rejected AIRTABLE_API_KEY (401 AUTHENTICATION_REQUIRED) — export a valid"
            f" personal access token from {TOKENS}",
        ),
        (
            ["airtable:appNOSUCHBASE0000/Docs"],
            {},
            "airtable:appNOSUCHBASE0000/Docs: no access (403 INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND) — check the"
            " base ID and table, and that the token has the data.records:read scope and access to this base",
        ),
        (
            [f"airtable:{BASE}/Nope"],
            {},
            f"airtable:{BASE}/Nope: not found (404 TABLE_NOT_FOUND) — check the base ID, the table name or"
            " ID (tbl…), and airtable_api_url",
        ),
        (
            [SPEC, "--airtable-body-field", "Notes", "--airtable-body-field", "Body"],
            {},
            f'{SPEC}: the table has no field "Body" — fix airtable_body_fields (--airtable-body-field)',
        ),
        (
            [SPEC, "--airtable-title-field", "Title"],
            {},
            f'{SPEC}: the table has no field "Title" — fix airtable_title_field (--airtable-title-field)',
        ),
        (
            [SPEC, "--airtable-url-field", "URL"],
            {},
            f'{SPEC}: the table has no field "URL" — fix airtable_url_field (--airtable-url-field)',
        ),
        (
            [SPEC, "--airtable-view", "Nope"],
            {},
            f"{SPEC}: the table has no view 'Nope' — fix airtable_view (--airtable-view)",
        ),
        (
            [SPEC, "--airtable-formula", "Status = Published"],
            {},
            f"{SPEC}: Airtable rejected airtable_formula (The formula for filtering records is invalid: Invalid"
            " formula. Please check your formula text.) — fix the formula (--airtable-formula)",
        ),
        (
            [SPEC, "--airtable-formula", "{Status} = 'Archived'"],
            {},
            f"{SPEC}: no records matching {{Status}} = 'Archived' — check the table, airtable_view and"
            " airtable_formula",
        ),
        (
            [SPEC, "--airtable-body-field", "Link"],
            {},
            f"{SPEC}: all 3 records are empty (no text in Link) — point airtable_body_fields"
            " (--airtable-body-field) at the columns that hold the text",
        ),
        (
            ["airtable:Docs"],
            {},
            "airtable:Docs: expected BASE_ID/TABLE, e.g. appXXXXXXXXXXXXXX/Docs — copy the base ID (app…) and"
            " the table name or ID (tbl…) from the table's URL",
        ),
        (
            [SPEC],
            {"FTKIT_AIRTABLE_API_URL": "CLOSED"},
            f"{SPEC}: cannot reach Airtable at CLOSED — check airtable_api_url and your network",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(
    runner: CliRunner,
    fake: FakeAirtable,
    docs: FakeTable,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    closed = _closed_port_url()
    for name, value in env.items():
        monkeypatch.setenv(name, closed if value == "CLOSED" else value)

    code, out, err = cli(runner, "ingest", *args)

    assert (code, out) == (1, "")
    assert err == "Error: " + expected.replace("CLOSED", closed) + "\n"
    assert API_KEY not in err


def test_a_slow_airtable_times_out(fake: FakeAirtable, docs: FakeTable, tmp_path: Path) -> None:
    fake.delay_s = 0.5

    with pytest.raises(AirtableError) as caught:
        read_airtable(SPEC, settings_for(tmp_path, airtable_timeout_s=0.1))

    assert str(caught.value) == (
        f"{SPEC}: Airtable did not answer within 0.1 s — re-run later, or raise airtable_timeout_s"
    )


def test_the_key_comes_from_the_environment_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ftkit.toml").write_text('airtable_api_key = "patX"\n')
    with pytest.raises(ConfigError) as in_toml:
        load_settings()
    monkeypatch.setenv("FTKIT_AIRTABLE_API_KEY", "patX")
    with pytest.raises(ConfigError) as in_ftkit_env:
        load_settings(config_file=tmp_path / "ftkit.toml")

    assert str(in_toml.value) == (
        "airtable_api_key cannot be set in ftkit.toml or FTKIT_* — secrets are read from AIRTABLE_API_KEY only"
    )
    assert str(in_ftkit_env.value) == (
        "FTKIT_AIRTABLE_API_KEY is not read — secrets come from AIRTABLE_API_KEY only; export that instead"
    )


def test_the_key_never_reaches_output_logs_or_the_database(
    runner: CliRunner, fake: FakeAirtable, docs: FakeTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")

    code, out, err = cli(runner, "--debug", "ingest", SPEC)
    settings = load_settings(workspace=tmp_path / "ws")

    assert code == 0 and "3 new documents" in out
    for text in (out, err, caplog.text, repr(settings), settings.model_dump_json()):
        assert API_KEY not in text
    for path in (tmp_path / "ws").rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


# --- the models-table sink -------------------------------------------------------------------------------

MODELS = f"{BASE}/Models"


def model(**changes: Any) -> RegisteredModel:
    values: dict[str, Any] = {
        "name": "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "backend": "openai",
        "base_model": "gpt-4o-mini-2024-07-18",
        "job_id": "ftjob-abc123",
        "dataset_hash": "d41d8cd98f00",
        "created_at": "2026-05-01T12:00:00+00:00",
        "metrics": {"train_loss": 0.42},
    }
    return RegisteredModel(**{**values, **changes})


@pytest.fixture
def models_table(fake: FakeAirtable) -> FakeTable:
    return fake.add_table("Models", ["Name", "Base model", "Job", "Dataset", "Created", "Metrics", "Notes"])


def test_a_model_is_created_then_updated_never_duplicated(
    fake: FakeAirtable, models_table: FakeTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FTKIT_AIRTABLE_MODELS_TABLE", MODELS)
    settings = load_settings(workspace=tmp_path / "ws")
    other = fake.add_record(models_table, {"Name": "ft:older", "Notes": "kept"})

    with Store(settings.db_path) as store:
        register_model(store, model())
        first = publish_pending(settings, store)
        models_table.records[-1]["fields"]["Notes"] = "a person's note"
        register_model(
            store, model(metrics={"train_loss": 0.4, "valid_loss": 0.5})
        )  # a re-watch, new metrics
        second = publish_pending(settings, store)

    name = model().name
    assert first == [f"Airtable: created model {name} in {MODELS}"]
    assert second == [f"Airtable: updated model {name} in {MODELS}"]
    assert len(models_table.records) == 2 and models_table.records[0]["id"] == other
    assert models_table.records[1]["fields"] == {
        "Name": name,
        "Base model": "gpt-4o-mini-2024-07-18",
        "Job": "ftjob-abc123",
        "Dataset": "d41d8cd98f00",
        "Created": "2026-05-01T12:00:00+00:00",
        "Metrics": '{"train_loss": 0.4, "valid_loss": 0.5}',
        "Notes": "a person's note",  # an upsert merges: columns ftkit does not write are left alone
    }
    upsert = fake.calls_to("PATCH")[-1].body
    assert upsert is not None
    assert (upsert["performUpsert"], upsert["typecast"]) == ({"fieldsToMergeOn": ["Name"]}, True)


def test_a_model_the_sink_could_not_take_is_written_on_the_next_call(
    fake: FakeAirtable, tmp_path: Path
) -> None:
    table = fake.add_table("Models", ["Name", "Base model", "Job", "Dataset", "Created"])  # no "Metrics" yet
    settings = load_settings(workspace=tmp_path / "ws", airtable_models_table=MODELS)
    older, newer = model(name="ft:older", created_at="2026-04-01T00:00:00+00:00"), model()
    with Store(settings.db_path) as store:
        register_model(store, older)
        register_model(store, newer)
        failed = publish_pending(settings, store)
        table.columns.append("Metrics")
        written = publish_pending(settings, store)
        again = publish_pending(settings, store)
    assert len(failed) == 1 and failed[0].startswith("Airtable: model ft:older not recorded: ")
    assert written == [f"Airtable: created model {m.name} in {MODELS}" for m in (older, newer)]
    assert again == []  # nothing pending: no request at all
    assert [r["fields"]["Name"] for r in table.records] == ["ft:older", newer.name]
    assert len(fake.calls_to("PATCH")) == 3  # the failed write, then one per model


def test_no_models_table_means_no_sink(fake: FakeAirtable, tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        register_model(store, model())
        assert publish_pending(settings, store) == []
    assert fake.calls == []


def test_a_sink_failure_is_a_line_and_the_model_stays_registered(
    fake: FakeAirtable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_table("Models", ["Name", "Base model", "Job", "Dataset", "Created"])
    settings = load_settings(workspace=tmp_path / "ws", airtable_models_table=MODELS)
    with Store(settings.db_path) as store:
        register_model(store, model())

        lines = publish_pending(settings, store)
        monkeypatch.delenv("AIRTABLE_API_KEY")
        without_key = publish_pending(
            load_settings(workspace=tmp_path / "ws", airtable_models_table=MODELS), store
        )

        assert [m.name for m in list_models(store)] == [model().name]
    name, label = model().name, f"Airtable models table {MODELS}"
    assert lines == [
        f'Airtable: model {name} not recorded: {label}: the table has no field "Metrics" — add a "Metrics"'
        " column to the table (Name, Base model, Job, Dataset, Created, Metrics)"
    ]
    assert without_key == [
        f"Airtable: model {name} not recorded: {label}: AIRTABLE_API_KEY is not set — create a personal"
        f" access token with the data.records:write scope at {TOKENS} and export it as AIRTABLE_API_KEY"
    ]


def test_a_malformed_models_table_setting_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ftkit.toml").write_text('[airtable]\nmodels_table = "Models"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == (
        "invalid setting 'airtable.models_table': Value error, 'Models' is not BASE_ID/TABLE — copy the base"
        " ID (app…) from the base's URL, e.g. appXXXXXXXXXXXXXX/Models — fix it in ftkit.toml,"
        " FTKIT_AIRTABLE_MODELS_TABLE or the matching flag"
    )


# --- ftkit sources ---------------------------------------------------------------------------------------


def test_sources_lists_each_source_with_its_counts(
    runner: CliRunner, fake: FakeAirtable, docs: FakeTable, tmp_path: Path
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "guide.md").write_text("# Guide\n\n" + TEXT)
    (folder / "blob.md").write_bytes(b"\x00\x01\x02")
    assert cli(runner, "ingest", str(folder), SPEC)[0] == 0

    code, out, _ = cli(runner, "sources", "--json")
    listed = json.loads(out)
    table_code, table, _ = cli(runner, "sources")

    assert code == 0 and table_code == 0
    assert [{k: v for k, v in row.items() if k != "last_sync"} for row in listed] == [
        {"kind": "airtable", "spec": SPEC, "documents": 3, "chunks": 3, "skipped": 0},
        {"kind": "directory", "spec": str(folder), "documents": 1, "chunks": 1, "skipped": 1},
    ]
    assert all(row["last_sync"] for row in listed)
    assert table.splitlines() == [
        f"{SPEC} (airtable): 3 documents, 3 chunks, 0 skipped, last sync {listed[0]['last_sync']}",
        f"{folder} (directory): 1 documents, 1 chunks, 1 skipped, last sync {listed[1]['last_sync']}",
    ]


def test_sources_without_a_workspace_says_how_to_start(runner: CliRunner) -> None:
    code, out, err = cli(runner, "sources")

    assert (code, out) == (1, "")
    assert err == "Error: ws: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace\n"


def test_sources_in_an_empty_workspace_says_how_to_add_one(runner: CliRunner, tmp_path: Path) -> None:
    Store(tmp_path / "ws" / "state.db").close()

    assert cli(runner, "sources") == (0, "No sources yet — `ftkit ingest DOCS` adds one.\n", "")
    assert cli(runner, "sources", "--json") == (0, "[]\n", "")


def test_the_field_mapping_in_ftkit_toml_holds_when_no_flag_is_given(
    runner: CliRunner, fake: FakeAirtable, tmp_path: Path
) -> None:
    table = fake.add_table("FAQ", ["Title", "Question", "Answer"])
    record = fake.add_record(table, {"Title": "Reset", "Question": "How?", "Answer": "Hold it."})
    (tmp_path / "ftkit.toml").write_text(
        '[airtable]\ntitle_field = "Title"\nbody_fields = ["Question", "Answer"]\n'
    )

    code, _, err = cli(runner, "ingest", f"airtable:{BASE}/FAQ")

    assert (code, err) == (0, "")
    with Store(tmp_path / "ws" / "state.db") as store:
        assert documents(store) == {record: "# Reset\n\n## Question\n\nHow?\n\n## Answer\n\nHold it.\n"}


def test_a_watched_fine_tune_lands_in_the_models_table(
    fake: FakeAirtable, models_table: FakeTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole way: `ftkit train --watch` on the fake OpenAI service registers the model and upserts it."""
    from tests.conftest import TEST_KEY
    from tests.fake_openai import FakeOpenAI, docs_responder

    dataset = tmp_path / "ws" / "dataset"
    dataset.mkdir(parents=True)
    example = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    (dataset / "train.jsonl").write_text(json.dumps(example) + "\n")
    monkeypatch.setenv("FTKIT_MIN_EXAMPLES", "1")
    monkeypatch.setenv("FTKIT_AIRTABLE_MODELS_TABLE", MODELS)
    monkeypatch.setenv("FTKIT_TRAINING_POLL_INTERVAL_S", "0.001")
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as openai:
        monkeypatch.setenv("OPENAI_BASE_URL", openai.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "train", "--watch"])
        [job] = openai.fine_tuning.jobs.values()
    assert result.exit_code == 0, result.stderr
    assert f"Airtable: created model {job.fine_tuned_model} in {MODELS}" in result.stdout
    assert [record["fields"]["Name"] for record in models_table.records] == [job.fine_tuned_model]
    assert models_table.records[0]["fields"]["Job"] == job.id
