"""Read a Slack export zip: one document per thread, names resolved, noise skipped, a permalink each.

The zip is read in memory entry by entry and never extracted; archives that could be zip bombs or that
name paths outside themselves are refused before anything is read.
"""

import html
import json
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

from finetune_kit.errors import SourceError
from finetune_kit.sources import (
    ReadContext,
    SkippedFile,
    SourceDocument,
    SourceIdentity,
    SourceItem,
    SourceIter,
    path_key,
)

MAX_ENTRIES = 20_000
MAX_TOTAL_BYTES = 1 << 30  # uncompressed, all entries together
MAX_ENTRY_BYTES = 64 << 20
MAX_RATIO = 100  # uncompressed / compressed; real Slack JSON compresses about 5-15x
RATIO_CHECKED_FROM = 1 << 20  # tiny entries can have any ratio without harm
EXPORT_URL_BASE = "slack-export://"
TITLE_CHARS = 80
# Everything else (joins, leaves, topic/purpose/name changes, pins, bot posts, reminders, tombstones) is noise.
KEPT_SUBTYPES = frozenset({"", "thread_broadcast", "file_share", "me_message"})
_MARKUP = re.compile(r"<([^<>\n]+)>")
_HEADING_LIKE = re.compile(r"^(#{1,6})(?=\s)", re.M)
_INLINE_FENCE = re.compile(r"```(.*?)```", re.S)
_TS = re.compile(r"\d{1,10}(\.\d{1,9})?")  # Slack's "1700000000.123456" (up to 2286); others are no timestamp


@dataclass(frozen=True)
class Workspace:
    """What message text refers to by id: people and channels."""

    user_names: dict[str, str]
    bot_users: frozenset[str]
    channel_names: dict[str, str]  # id -> name


def is_slack_export(spec: str) -> bool:
    """Say whether a corpus argument is a zip file (read as a Slack export)."""
    path = Path(spec).expanduser()
    return path.suffix.lower() == ".zip" and path.is_file()


def iter_slack_export(path: Path, workspace_url: str | None = None) -> SourceIter:
    """Yield one document per thread of every channel in the export, in channel and time order."""
    label = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(
            f"{label}: cannot open as a zip file ({exc}) — pass the .zip Slack exported"
        ) from exc
    with archive:
        check_archive(archive, label)
        prefix = _export_root(archive, label)
        channels = _load_list(archive, prefix + "channels.json", label) + _load_optional(
            archive, prefix + "groups.json", label
        )
        users = _load_optional(archive, prefix + "users.json", label)
        workspace = _workspace(users, channels)
        base = _permalink_base(workspace_url)
        items: list[SkippedFile | SourceDocument] = []
        for channel in sorted(channels, key=lambda c: str(c.get("name", ""))):
            messages = _channel_messages(archive, prefix + str(channel.get("name", "")) + "/", label)
            items.extend(_thread_documents(channel, messages, workspace, base))
        items.extend(_unknown_folders(archive, prefix, channels))
    return iter(items)


def check_archive(archive: zipfile.ZipFile, label: str) -> None:
    """Refuse zip bombs (too many entries, too big, too compressed) and entries naming paths outside the zip."""
    entries = archive.infolist()
    if len(entries) > MAX_ENTRIES:
        raise SourceError(
            f"{label}: {len(entries)} entries, over the {MAX_ENTRIES} ftkit reads — refusing a possible zip bomb"
        )
    total = 0
    for entry in entries:
        if _escapes_archive(entry.filename):
            raise SourceError(
                f"{label}: entry '{entry.filename}' points outside the archive — refusing a zip with path traversal"
            )
        if entry.file_size > MAX_ENTRY_BYTES:
            raise SourceError(
                f"{label}: entry '{entry.filename}' unpacks to {_size(entry.file_size)}, over the"
                f" {_size(MAX_ENTRY_BYTES)} limit per entry — refusing a possible zip bomb"
            )
        total += entry.file_size
        if total > MAX_TOTAL_BYTES:
            raise SourceError(
                f"{label}: unpacks to more than {_size(MAX_TOTAL_BYTES)} — refusing a possible zip bomb"
            )
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size >= RATIO_CHECKED_FROM and ratio > MAX_RATIO:
            raise SourceError(
                f"{label}: entry '{entry.filename}' expands {ratio:.0f} times ({_size(entry.file_size)} from"
                f" {entry.compress_size} bytes), over the {MAX_RATIO}x limit — refusing a possible zip bomb"
            )


def _escapes_archive(name: str) -> bool:
    """True for absolute names (/x, \\x, C:x) and names with a '..' component."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _size(size: int) -> str:
    return f"{size / (1 << 20):.0f} MB" if size >= 1 << 20 else f"{size} bytes"


def _export_root(archive: zipfile.ZipFile, label: str) -> str:
    """The folder holding channels.json: the zip's top, or one folder down (a re-zipped export)."""
    tops = sorted(
        name.removesuffix("channels.json")
        for name in archive.namelist()
        if PurePosixPath(name).name == "channels.json" and name.count("/") <= 1
    )
    if not tops:
        raise SourceError(
            f"{label}: not a Slack export (no channels.json) — export the workspace from Slack's"
            " Settings → Import/Export Data and pass that zip"
        )
    return tops[0]


def _read_json(archive: zipfile.ZipFile, name: str, label: str) -> Any:
    """Parse one entry as JSON; errors name the entry and the position."""
    try:
        raw = archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted entry; NotImplementedError: a compression method zipfile lacks
        raise SourceError(f"{label}: entry '{name}' cannot be read ({exc}) — re-export from Slack") from exc
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{label}: entry '{name}' is not UTF-8 (byte {exc.start}) — re-export from Slack"
        ) from exc
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{label}: entry '{name}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            " — re-export from Slack"
        ) from exc


def _load_list(archive: zipfile.ZipFile, name: str, label: str) -> list[dict[str, Any]]:
    """An entry that must hold a JSON list of objects."""
    value = _read_json(archive, name, label)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise SourceError(f"{label}: entry '{name}' is not a JSON list of objects — re-export from Slack")
    return value


def _load_optional(archive: zipfile.ZipFile, name: str, label: str) -> list[dict[str, Any]]:
    """Like _load_list, but a missing entry is an empty list (users.json, groups.json are optional)."""
    return _load_list(archive, name, label) if name in archive.NameToInfo else []


def _workspace(users: list[dict[str, Any]], channels: list[dict[str, Any]]) -> Workspace:
    """Index users by id (to their real name, else display name, else handle) and channels by id."""
    names: dict[str, str] = {}
    bots: set[str] = {"USLACKBOT"}
    for user in users:
        profile = _object(user.get("profile"))
        candidates = (profile.get("real_name"), user.get("real_name"), profile.get("display_name"))
        names[str(user.get("id"))] = str(
            next((c for c in candidates if c), user.get("name") or user.get("id"))
        )
        if user.get("is_bot") is True or user.get("is_app_user") is True:
            bots.add(str(user.get("id")))
    channel_names = {str(c.get("id")): str(c.get("name")) for c in channels}
    return Workspace(names, frozenset(bots), channel_names)


def _permalink_base(workspace_url: str | None) -> str:
    """https://acme.slack.com from the setting (scheme optional); slack-export:// when it is unset."""
    if not workspace_url:
        return EXPORT_URL_BASE
    url = workspace_url.strip().rstrip("/")
    return (url if "://" in url else "https://" + url) + "/"


def _channel_messages(archive: zipfile.ZipFile, folder: str, label: str) -> list[dict[str, Any]]:
    """Every message of one channel, from its day files in date order."""
    days = sorted(
        name
        for name in archive.namelist()
        if name.startswith(folder) and name.endswith(".json") and "/" not in name[len(folder) :]
    )
    messages: list[dict[str, Any]] = []
    for day in days:
        messages.extend(_load_list(archive, day, label))
    return messages


def _thread_documents(
    channel: dict[str, Any], messages: list[dict[str, Any]], workspace: Workspace, base: str
) -> Iterator[SourceDocument]:
    """Group a channel's messages into threads (root + replies across days) and render each one."""
    threads: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for message in messages:
        ts = str(message.get("ts", ""))
        if _ts_key(ts) is not None and _is_conversation(message, workspace):
            thread_ts = str(message.get("thread_ts") or ts)
            if _ts_key(thread_ts) is None:
                thread_ts = ts  # a reply to a thread that cannot be named starts its own
            threads[thread_ts][ts] = message  # keyed by ts: duplicates collapse
    name, channel_id = str(channel.get("name", "")), str(channel.get("id", ""))
    for thread_ts in sorted(threads, key=_sort_key):
        thread = [threads[thread_ts][ts] for ts in sorted(threads[thread_ts], key=_sort_key)]
        rendered = [(message, body) for message in thread if (body := _message_text(message, workspace))]
        if rendered:
            url = f"{base}archives/{channel_id}/p{thread_ts.replace('.', '')}"
            text = _render_thread(name, rendered, workspace)
            yield SourceDocument(path=f"#{name}/{thread_ts}", source_url=url, text=text, format="markdown")


def _ts_key(ts: str) -> Decimal | None:
    """A message timestamp ("1700000000.123456") as an exact number; None when it is not one."""
    return Decimal(ts) if _TS.fullmatch(ts) else None  # not NaN, Infinity, 1e20 or -5


def _sort_key(ts: str) -> Decimal:
    return _ts_key(ts) or Decimal(0)


def _is_conversation(message: dict[str, Any], workspace: Workspace) -> bool:
    """Keep what people wrote; drop joins, leaves, topic changes, bots and other channel noise."""
    if str(message.get("subtype") or "") not in KEPT_SUBTYPES:
        return False
    return not (message.get("bot_id") or str(message.get("user")) in workspace.bot_users)


def _render_thread(channel: str, thread: list[tuple[dict[str, Any], str]], workspace: Workspace) -> str:
    """A Markdown document: a title from the first message, then each message under its author and time."""
    first, first_body = thread[0]
    first_line = next((line.strip() for line in first_body.splitlines() if line.strip()), "")
    title = first_line.lstrip("#>*_~`\\ ").strip() or f"Thread in #{channel}"
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip() + "…"
    started = _when(first).split(" ")[0]
    parts = [
        f"# {title}",
        f"Slack thread in #{channel}, started by {_author(first, workspace)} on {started}.",
    ]
    parts += [f"**{_author(message, workspace)}** ({_when(message)}):\n{body}" for message, body in thread]
    return "\n\n".join(parts)


def _author(message: dict[str, Any], workspace: Workspace) -> str:
    """The author's name from users.json, else the profile embedded in the message, else the id."""
    user = str(message.get("user") or "")
    if user in workspace.user_names:
        return workspace.user_names[user]
    profile = _object(message.get("user_profile"))
    return str(profile.get("real_name") or profile.get("display_name") or user or "unknown")


def _when(message: dict[str, Any]) -> str:
    ts = _ts_key(str(message.get("ts", ""))) or Decimal(0)
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M UTC")


def _message_text(message: dict[str, Any], workspace: Workspace) -> str:
    """Slack markup made readable: mentions by name, links as Markdown, code fences on their own lines."""
    text = _MARKUP.sub(
        lambda match: _render_markup(match.group(1), workspace), str(message.get("text") or "")
    )
    text = html.unescape(text)
    text = _INLINE_FENCE.sub(lambda m: "\n```\n" + m.group(1).strip("\n") + "\n```\n", text).strip()
    text = _HEADING_LIKE.sub(r"\\\1", text)  # a line starting "# " in a message is not a document heading
    files = [f.get("title") or f.get("name") for f in _list(message.get("files")) if isinstance(f, dict)]
    attached = [f"(attached file: {name})" for name in files if name]
    return "\n".join([text, *attached]).strip()


def _object(value: object) -> dict[str, Any]:
    """A nested JSON object, or an empty one when the export holds something else there."""
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _render_markup(token: str, workspace: Workspace) -> str:
    """One <...> token: <@U1>, <#C1|name>, <!here>, <!subteam^S1|@team>, <url|label>, <url>."""
    target, _, label = token.partition("|")
    if target.startswith("@"):
        return "@" + workspace.user_names.get(target[1:], label or target[1:])
    if target.startswith("#"):
        return "#" + (label or workspace.channel_names.get(target[1:], target[1:]))
    if target.startswith("!"):
        return label or "@" + target[1:].split("^")[0]
    if target.startswith("mailto:"):
        return label or target.removeprefix("mailto:")
    return f"[{label}]({target})" if label and label != target else target


def _unknown_folders(
    archive: zipfile.ZipFile, prefix: str, channels: list[dict[str, Any]]
) -> list[SkippedFile]:
    """Folders that are not listed channels (direct messages, group DMs) are reported, not read."""
    known = {str(channel.get("name")) for channel in channels}
    folders = {
        name[len(prefix) :].split("/")[0]
        for name in archive.namelist()
        if name.startswith(prefix) and "/" in name[len(prefix) :]
    } - {"__MACOSX"}  # macOS's resource forks, when someone re-zipped the export
    return [
        SkippedFile(folder + "/", "not a channel in channels.json (direct messages are not read)")
        for folder in sorted(folders - known)
    ]


class SlackExportSource:
    """A Slack export: an existing .zip file."""

    name = "slack-export"

    def claims(self, spec: str) -> bool:
        """Say whether `spec` is a zip file."""
        return is_slack_export(spec)

    def identity(self, spec: str) -> SourceIdentity:
        """The zip's absolute path."""
        return SourceIdentity("slack-export", path_key(spec))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """One document per thread."""
        return list(iter_slack_export(Path(spec).expanduser(), context.settings.slack.workspace_url))
