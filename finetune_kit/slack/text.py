"""Slack message text: to plain text for the model, from Markdown to mrkdwn, and split below Slack's limits."""

import html
import re

# Slack truncates `text` past 40,000 characters and recommends at most 4,000 per message; stay below that.
MAX_MESSAGE_CHARS = 3_900

_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL = re.compile(r"<#([CG][A-Z0-9]+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!(?:subteam\^[A-Z0-9]+\|)?([^>|]+)(?:\|([^>]*))?>")
_LINK = re.compile(r"<((?:https?|mailto):[^>|]+)(?:\|([^>]*))?>")
_FENCE = re.compile(r"^\s*```")
_CODE_SPAN = re.compile(r"(`[^`\n]+`)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_ITALIC = re.compile(r"(?<![*\w])\*(?!\s)([^*\n]+?)(?<!\s)\*(?![*\w])")
_STRIKE = re.compile(r"~~(.+?)~~")
_MD_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")


def mentions(text: str, user_id: str) -> bool:
    """True when a Slack message's text mentions the user `user_id`."""
    return any(match.group(1) == user_id for match in _MENTION.finditer(text))


def slack_to_plain(text: str, bot_user_id: str) -> str:
    """A Slack message as the model should read it: no mention of the bot, links and names spelled out."""

    def mention(match: re.Match[str]) -> str:
        if match.group(1) == bot_user_id:
            return ""
        return "@" + (match.group(2) or match.group(1))

    text = _MENTION.sub(mention, text)
    text = _CHANNEL.sub(lambda m: "#" + (m.group(2) or m.group(1)), text)
    text = _SPECIAL.sub(lambda m: "@" + (m.group(2) or m.group(1)).lstrip("@"), text)
    text = _LINK.sub(lambda m: f"{m.group(2)} ({m.group(1)})" if m.group(2) else m.group(1), text)
    text = html.unescape(text)
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines()).strip()


def escape(text: str) -> str:
    """Escape the three characters Slack reserves, so `<!channel>` in an answer notifies no one."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def link(url: str, label: str) -> str:
    """A Slack link `<url|label>`: both escaped, and a `|` in the URL encoded so it cannot end the URL early."""
    return f"<{escape(url).replace('|', '%7C')}|{escape(label)}>"


def to_mrkdwn(markdown: str) -> str:
    """Markdown (as models write it) in Slack's mrkdwn: bold, italics, links, headings, bullets, code."""
    lines, in_code = [], False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            lines.append("```")  # Slack shows a language tag as text
            in_code = not in_code
        elif in_code:
            lines.append(escape(line))
        else:
            lines.append(_mrkdwn_line(line))
    if in_code:
        lines.append("```")
    return "\n".join(lines).strip()


def _mrkdwn_line(line: str) -> str:
    heading = _HEADING.match(line)
    if heading:
        return f"*{_mrkdwn_inline(heading.group(1).strip('*'))}*"
    bullet = _BULLET.match(line)
    if bullet:
        return bullet.group(1) + "• " + _mrkdwn_inline(line[bullet.end() :])
    return _mrkdwn_inline(line)


def _mrkdwn_inline(text: str) -> str:
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):  # odd indexes are `code spans`: escaped, never reformatted
        part = escape(parts[i])
        part = _MD_LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", part)
        part = _BOLD.sub(lambda m: "\x00" + (m.group(1) or m.group(2)) + "\x00", part)
        part = _ITALIC.sub(r"_\1_", part)
        part = _STRIKE.sub(r"~\1~", part)
        parts[i] = part.replace("\x00", "*")
    for i in range(1, len(parts), 2):
        parts[i] = escape(parts[i])
    return "".join(parts)


def split_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Consecutive parts of at most `limit` characters, cut at paragraphs, lines or words; code fences reopened."""
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = _cut_point(rest, limit - 8)  # room to close and reopen a code fence
        part, rest = rest[:cut].rstrip(), rest[cut:].lstrip("\n ")
        if part.count("```") % 2:
            part, rest = part + "\n```", "```\n" + rest
        parts.append(part)
    return [*parts, rest] if rest else parts


def _cut_point(text: str, limit: int) -> int:
    """Where to end a part: the last paragraph break, else line break, else space in its second half."""
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, limit // 2, limit)
        if at > 0:
            return at
    amp = text.rfind("&", limit - 6, limit)  # never cut an escape like &amp; in two
    return amp if amp > 0 and ";" not in text[amp:limit] else limit
