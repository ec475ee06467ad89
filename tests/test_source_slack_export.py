"""Slack export zips, built in each test: one document per thread, names resolved, noise skipped, bad zips refused."""

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import load_settings
from finetune_kit.sources import SkippedFile, SourceDocument, slack_export
from finetune_kit.sources.slack_export import iter_slack_export
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store

ROOT_TS = "1700000000.000100"  # 2023-11-14 22:13 UTC
CHANNELS = [{"id": "C01GENERAL", "name": "general"}, {"id": "C02OPS", "name": "ops"}]
USERS = [
    {"id": "U1", "name": "alice", "profile": {"real_name": "Alice Smith", "display_name": "ali"}},
    {"id": "U2", "name": "bob", "profile": {"real_name": "", "display_name": "Bob"}},
    {"id": "U3", "name": "carol"},
    {"id": "UBOT", "name": "deploybot", "is_bot": True},
]
DAY_ONE = [
    {"type": "message", "subtype": "channel_join", "user": "U3", "text": "<@U3> has joined the channel",
     "ts": "1699999000.000001"},
    {"type": "message", "user": "U1", "text": "How do I rotate the API key? cc <@U2>", "ts": ROOT_TS,
     "thread_ts": ROOT_TS, "reply_count": 2},
    {"type": "message", "user": "U2", "ts": "1700000100.000200", "thread_ts": ROOT_TS,
     "text": "See <#C02OPS|ops> and <https://docs.example.com/keys|the key docs> &amp; <https://x.example>"},
    {"type": "message", "subtype": "bot_message", "bot_id": "B1", "text": "Deploy finished", "ts": "1700000200.000001"},
    {"type": "message", "user": "UBOT", "text": "build green", "ts": "1700000250.000001"},
    {"type": "message", "subtype": "channel_topic", "user": "U1", "text": "set the topic", "ts": "1700000300.000001"},
]  # fmt: skip
DAY_TWO = [
    {"type": "message", "user": "U1", "ts": "1700090000.000300", "thread_ts": ROOT_TS,
     "text": "Thanks, <!here>: done with `ftkit keys rotate`", "files": [{"name": "log.txt", "title": "rotation log"}]},
    {"type": "message", "user": "U3", "text": "Is the office open on Friday?", "ts": "1700090500.000400"},
    {"type": "message", "subtype": "channel_leave", "user": "U3", "text": "left", "ts": "1700090600.000001"},
]  # fmt: skip
THREAD_TEXT = """# How do I rotate the API key? cc @Bob

Slack thread in #general, started by Alice Smith on 2023-11-14.

**Alice Smith** (2023-11-14 22:13 UTC):
How do I rotate the API key? cc @Bob

**Bob** (2023-11-14 22:15 UTC):
See #ops and [the key docs](https://docs.example.com/keys) & https://x.example

**Alice Smith** (2023-11-15 23:13 UTC):
Thanks, @here: done with `ftkit keys rotate`
(attached file: rotation log)"""


def write_zip(path: Path, entries: dict[str, Any], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip whose entries are JSON values, or raw bytes/str written as they are."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, value in entries.items():
            archive.writestr(name, value if isinstance(value, bytes | str) else json.dumps(value))
    return path


def export_zip(path: Path, **extra: Any) -> Path:
    entries = {
        "channels.json": CHANNELS,
        "users.json": USERS,
        "general/2023-11-14.json": DAY_ONE,
        "general/2023-11-15.json": DAY_TWO,
        "ops/2023-11-15.json": [{"type": "message", "user": "U2", "text": "Pager rota is in the wiki", "ts": "1700090700.000500"}],
    }  # fmt: skip
    return write_zip(path, entries | extra)


def read(path: Path, workspace_url: str | None = None) -> list[SourceDocument | SkippedFile]:
    return list(iter_slack_export(path, workspace_url))


def test_one_document_per_thread_with_names_resolved_and_noise_skipped(tmp_path: Path) -> None:
    items = read(export_zip(tmp_path / "export.zip"))
    assert [item.path for item in items] == [
        f"#general/{ROOT_TS}",
        "#general/1700090500.000400",
        "#ops/1700090700.000500",
    ]
    thread = items[0]
    assert isinstance(thread, SourceDocument)
    assert thread.text == THREAD_TEXT
    assert thread.format == "markdown"
    single = items[1]
    assert isinstance(single, SourceDocument)
    assert single.text == (
        "# Is the office open on Friday?\n\nSlack thread in #general, started by carol on 2023-11-15.\n\n"
        "**carol** (2023-11-15 23:21 UTC):\nIs the office open on Friday?"
    )
    everything = "\n".join(item.text for item in items if isinstance(item, SourceDocument))
    for noise in ("has joined", "Deploy finished", "build green", "set the topic", "left"):
        assert noise not in everything


def test_permalinks_use_the_workspace_url_setting_or_a_stable_export_url(tmp_path: Path) -> None:
    path = export_zip(tmp_path / "export.zip")
    assert read(path)[0].source_url == "slack-export://archives/C01GENERAL/p1700000000000100"  # type: ignore[union-attr]
    linked = read(path, "acme.slack.com/")
    assert [item.source_url for item in linked] == [  # type: ignore[union-attr]
        "https://acme.slack.com/archives/C01GENERAL/p1700000000000100",
        "https://acme.slack.com/archives/C01GENERAL/p1700090500000400",
        "https://acme.slack.com/archives/C02OPS/p1700090700000500",
    ]


def test_ingest_reads_the_zip_incrementally_with_the_setting(tmp_path: Path) -> None:
    path = export_zip(tmp_path / "export.zip")
    settings = load_settings(workspace=tmp_path / "ws", slack_workspace_url="https://acme.slack.com")
    with Store(settings.db_path) as store:
        first = ingest(store, settings, [str(path)])
        second = ingest(store, settings, [str(path)])
        kind = store.scalar("SELECT kind FROM sources")
        urls = [row[0] for row in store.db.execute("SELECT source_url FROM chunks ORDER BY source_url")]
    assert (first.documents_new, second.documents_new, second.documents_unchanged, second.chunks_new) == (
        3,
        0,
        3,
        0,
    )
    assert kind == "slack-export"
    assert urls[0] == "https://acme.slack.com/archives/C01GENERAL/p1700000000000100"


def test_setting_the_workspace_url_later_relinks_the_threads_and_keeps_their_chunks(tmp_path: Path) -> None:
    path = export_zip(tmp_path / "export.zip")
    with Store(tmp_path / "ws" / "state.db") as store:
        ingest(store, load_settings(workspace=tmp_path / "ws"), [str(path)])
        before = dict(store.db.execute("SELECT id, source_url FROM chunks WHERE status = 'active'"))
        settings = load_settings(workspace=tmp_path / "ws", slack_workspace_url="https://acme.slack.com")
        ingest(store, settings, [str(path)])
        after = dict(store.db.execute("SELECT id, source_url FROM chunks WHERE status = 'active'"))
        documents = [
            row[0] for row in store.db.execute("SELECT source_url FROM documents ORDER BY source_url")
        ]
    assert after.keys() == before.keys()  # same chunk ids: their questions and answers stay
    assert {url.split("/archives/")[0] for url in after.values()} == {"https://acme.slack.com"}
    assert (
        documents[0] == "https://acme.slack.com/archives/C01GENERAL/p1700000000000100" and len(documents) == 3
    )


@pytest.mark.parametrize(
    "odd",
    [
        {"ts": "NaN"},
        {"ts": "Infinity"},
        {"ts": "1e20"},
        {"ts": "-5"},
        {"ts": "99999999999999"},
        {"ts": 5},
        {"thread_ts": "NaN"},
        {"thread_ts": ["x"]},
        {"user": ["U1"]},
        {"user_profile": "x"},
        {"files": 5},
        {"files": ["x", {"title": 7}]},
        {"text": {"a": 1}},
        {"subtype": None, "bot_id": None},
    ],
)
def test_odd_values_in_valid_json_do_not_break_the_export(tmp_path: Path, odd: dict[str, Any]) -> None:
    message = {"type": "message", "user": "U9", "text": "Odd one", "ts": "1700000500.000700"} | odd
    users = [*USERS, {"id": "U9", "name": "dora", "profile": "not an object", "is_bot": "no"}]
    path = export_zip(tmp_path / "export.zip", **{"users.json": users, "ops/2023-11-16.json": [message]})
    documents = [item for item in read(path) if isinstance(item, SourceDocument)]
    assert documents[0].text == THREAD_TEXT  # everything else is read as before
    assert {item.path.split("/")[0] for item in documents} == {"#general", "#ops"}


def test_a_new_reply_makes_a_new_version_of_its_thread_only(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    reply = {
        "type": "message",
        "user": "U2",
        "text": "Rotated here too.",
        "ts": "1700200000.000900",
        "thread_ts": ROOT_TS,
    }
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(export_zip(tmp_path / "export.zip"))])
        later = export_zip(tmp_path / "export.zip", **{"general/2023-11-17.json": [reply]})
        report = ingest(store, settings, [str(later)])
    assert (report.documents_new, report.documents_unchanged, report.documents_retired) == (1, 2, 1)


def test_folders_that_are_not_channels_are_reported_not_read(tmp_path: Path) -> None:
    dm = [{"type": "message", "user": "U1", "text": "private", "ts": "1700000000.000001"}]
    items = read(export_zip(tmp_path / "export.zip", **{"D0123/2023-11-14.json": dm, "__MACOSX/._x": b""}))
    assert [item for item in items if isinstance(item, SkippedFile)] == [
        SkippedFile("D0123/", "not a channel in channels.json (direct messages are not read)")
    ]


def test_an_export_zipped_inside_a_folder_is_read(tmp_path: Path) -> None:
    entries = {"acme-export/channels.json": CHANNELS, "acme-export/general/2023-11-15.json": DAY_TWO}
    items = read(write_zip(tmp_path / "export.zip", entries))
    # the reply's root is in a day file left out: the reply still belongs to (and links to) its thread
    assert [item.path for item in items] == [f"#general/{ROOT_TS}", "#general/1700090500.000400"]


def ftkit_ingest(runner: CliRunner, path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["--workspace", "ws", "ingest", str(path)])
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"channels.json": CHANNELS, "general/2023-11-14.json": b'[\n  {"ts": "1"\n  "user": 2}\n]'},
            "entry 'general/2023-11-14.json' is not valid JSON (line 3, column 3: Expecting ',' delimiter)"
            " — re-export from Slack",
        ),
        (
            {"channels.json": CHANNELS, "../../etc/cron.d/evil.json": []},
            "entry '../../etc/cron.d/evil.json' points outside the archive — refusing a zip with path traversal",
        ),
        (
            {"channels.json": CHANNELS, "/etc/passwd": "root"},
            "entry '/etc/passwd' points outside the archive — refusing a zip with path traversal",
        ),
        (
            {"channels.json": {"general": "C01"}},
            "entry 'channels.json' is not a JSON list of objects — re-export from Slack",
        ),
        (
            {"users.json": USERS},
            "not a Slack export (no channels.json) — export the workspace from Slack's"
            " Settings → Import/Export Data and pass that zip",
        ),
        (
            {"channels.json": CHANNELS, "general/2023-11-14.json": b"\xff\xfe[]"},
            "entry 'general/2023-11-14.json' is not UTF-8 (byte 0) — re-export from Slack",
        ),
    ],
    ids=[
        "malformed-json",
        "path-traversal",
        "absolute-path",
        "wrong-shape",
        "no-channels",
        "not-utf8",
    ],
)
def test_bad_exports_fail_with_one_line_and_exit_1(
    runner: CliRunner, tmp_path: Path, entries: dict[str, Any], message: str
) -> None:
    code, err = ftkit_ingest(runner, write_zip(tmp_path / "export.zip", entries))
    assert (code, err) == (1, f"Error: export.zip: {message}\n")


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(runner: CliRunner, tmp_path: Path) -> None:
    entries = {"channels.json": CHANNELS, "general/2023-11-14.json": b"[" + b" " * (20 << 20) + b"]"}
    path = write_zip(tmp_path / "export.zip", entries)
    packed = zipfile.ZipFile(path).getinfo("general/2023-11-14.json").compress_size
    code, err = ftkit_ingest(runner, path)
    assert (code, err) == (
        1,
        f"Error: export.zip: entry 'general/2023-11-14.json' expands {((20 << 20) + 2) / packed:.0f} times"
        f" (20 MB from {packed} bytes), over the 100x limit — refusing a possible zip bomb\n",
    )


def test_too_many_entries_is_refused(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slack_export, "MAX_ENTRIES", 3)
    entries = {"channels.json": CHANNELS} | {f"general/2023-11-{day:02}.json": [] for day in range(1, 5)}
    code, err = ftkit_ingest(runner, write_zip(tmp_path / "export.zip", entries))
    assert (code, err) == (
        1,
        "Error: export.zip: 5 entries, over the 3 ftkit reads — refusing a possible zip bomb\n",
    )


def test_too_much_data_in_all_is_refused(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slack_export, "MAX_TOTAL_BYTES", 1000)
    entries = {
        "channels.json": CHANNELS,
        "general/2023-11-14.json": DAY_ONE,
        "general/2023-11-15.json": DAY_TWO,
    }
    code, err = ftkit_ingest(runner, write_zip(tmp_path / "export.zip", entries))
    assert (code, err) == (
        1,
        "Error: export.zip: unpacks to more than 1000 bytes — refusing a possible zip bomb\n",
    )


def test_one_huge_entry_is_refused(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slack_export, "MAX_ENTRY_BYTES", 100)
    entries = {"channels.json": CHANNELS, "general/2023-11-14.json": DAY_ONE}
    code, err = ftkit_ingest(runner, write_zip(tmp_path / "export.zip", entries, zipfile.ZIP_STORED))
    size = len(json.dumps(DAY_ONE))
    assert (code, err) == (
        1,
        f"Error: export.zip: entry 'general/2023-11-14.json' unpacks to {size} bytes, over the 100 bytes limit"
        " per entry — refusing a possible zip bomb\n",
    )


def test_a_file_that_is_not_a_zip_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "export.zip").write_text("not a zip")
    code, err = ftkit_ingest(runner, tmp_path / "export.zip")
    assert (code, err) == (
        1,
        "Error: export.zip: cannot open as a zip file (File is not a zip file) — pass the .zip Slack exported\n",
    )
