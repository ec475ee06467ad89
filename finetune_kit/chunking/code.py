"""Split source code into chunks at function and class boundaries; every chunk knows its line range.

Python is parsed with the standard library's `ast` (exact ranges: decorators, docstrings and the comments right
above a definition included). Other languages, and Python that does not parse, are split by indentation: a block
starts at a line at the outer indent that follows a blank line, a closing line (`}`, `end`) or deeper lines, and
its name comes from its first code line (`func Save`, `fn parse`, `class Store`, `main()`). No third-party parser:
the maintained tree-sitter grammar pack downloads its grammars at run time, and the one-wheel-per-grammar route
would add a dependency per language and still leave half of the supported extensions to a fallback.

The rules, in order:

1. Units. A file's top-level statements become units; a function or class is a *definition* and has a name
   (`def save`, `class Store`). Comment lines right above a unit belong to it; other lines between units belong
   to the unit before them. Blank lines never start or end a unit.
2. Definitions stand alone. A definition of at least `min_tokens` is a chunk of its own, so editing one function
   changes no other function's chunk (nor its id, nor its questions). Smaller units next to each other (imports,
   constants, one-line helpers) are packed together up to `target_tokens`.
3. Splitting. A unit bigger than the target is split into its parts: a class at its methods, a Python function at
   its statements, an indented block at its inner blocks, recursively (at most `_MAX_SPLIT_DEPTH` levels: deeper
   nesting is cut as lines); a part without parts is cut at blank lines, then lines, then (one huge line) tokens.
   No line is lost or repeated.
4. Leftovers. A chunk still under `min_tokens` joins the previous chunk (else the next) when the two fit, except
   that the pieces of a split unit never join what lies outside it.

A chunk's text is a `# path > class Store > def save` heading line and its lines, fenced; its heading path is
`(path, "class Store", "def save")` (the names its units share). `overlap_tokens` is not used: pieces of code do
not repeat lines.
"""

from __future__ import annotations

import ast
import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from finetune_kit.chunking.markdown import DEFAULT_SETTINGS, Chunk, ChunkSettings
from finetune_kit.sources.text import fenced
from finetune_kit.tokens import count_tokens, truncate_tokens

CODE_CHUNKER_VERSION = 1  # bump when chunks would be cut differently, so ingest re-chunks code documents

_WRAPPED_FENCE = re.compile(r"(`{3,})([^`\n]*)")
_COMMENT = re.compile(r"\s*(?://|/\*|\*|#(?!\[)|--|;|<!--)")
_ATTRIBUTE = re.compile(r"\s*(?:@|#\[|\[[A-Z])")  # decorators, annotations, Rust and C# attributes
_CLOSER = re.compile(r"\s*(?:[})\]]|(?:end|fi|done|esac)\b\s*[;)]*\s*$)")
_CONTINUES = re.compile(r"\s*(?:[{})\]]|(?:end|fi|done|esac|else|elif|elsif|except|finally|catch|rescue)\b)")
_MODIFIERS = (
    r"export|default|public|private|protected|internal|static|final|abstract|sealed|async|unsafe|const|open"
    r"|override|data|inline|virtual|partial|readonly|declare|pub(?:\([^)]*\))?|extern(?:\s+\"[^\"]*\")?"
)
_KEYWORD_DEFINITION = re.compile(
    rf"\s*(?:(?:{_MODIFIERS})\s+)*(class|struct|enum|interface|trait|impl|func|fn|fun|function\*?|def|module"
    r"|object|type|record|protocol|extension|namespace|union|mod)\s*(?:<[^>]*>\s*)?(?:\([^)]*\)\s*)?"
    r"([A-Za-z_$][\w$]*)"
)
_VARIABLE_FUNCTION = re.compile(
    r"\s*(?:export\s+)?(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*(?::[^=]*)?=\s*(?:async\s*)?"
    r"(?:function\b|\([^)]*\)\s*(?::[^=]*)?=>|[A-Za-z_$][\w$]*\s*=>)"
)
_SIGNATURE = re.compile(r"\s*((?:[\w:<>\[\],*&]+\s+)+)[*&]*([A-Za-z_~][\w:~]*)\s*\(")
_NOT_A_TYPE = frozenset(
    {"return", "if", "while", "for", "switch", "else", "new", "throw", "case", "sizeof", "do"}
)
_SHELL_FUNCTION = re.compile(r"\s*([A-Za-z_][\w-]*)\s*\(\)\s*\{?\s*$")
_SQL_DEFINITION = re.compile(
    r"\s*create\s+(?:or\s+replace\s+)?(table|view|function|procedure|index|trigger|type)\s+"
    r"(?:if\s+not\s+exists\s+)?([\w.\"`]+)",
    re.I,
)
_WINDOW_CHARS_PER_TOKEN = 4
# A heading that leaves less room than this for code is over the target by itself: such a chunk is cut no further.
_MIN_ROOM = 8
_MAX_SPLIT_DEPTH = 64  # splitting recurses once per nesting level; a file nested deeper is cut by lines there
_NAME_SCAN_CHARS = 300  # names are looked for at the start of a line; a minified line is not scanned whole


@dataclass(frozen=True)
class CodeChunk(Chunk):
    """A chunk of a source file and the 1-based, inclusive line range it covers."""

    start_line: int
    end_line: int


@dataclass(frozen=True)
class _Unit:
    """Lines `start`..`end` (0-based, inclusive) that move together, with the names of what encloses them."""

    start: int
    end: int
    names: tuple[str, ...]
    definition: bool = False
    parts: Callable[[], list[_Unit]] | None = None  # smaller units that cover the same lines, if known


@dataclass
class _Group:
    """Lines that become one chunk (before rendering), and whether more small units may join them."""

    start: int
    end: int
    names: tuple[str, ...]
    open: bool = False  # small units may still join it
    sealed: bool = False  # a piece of a split unit: never merged with what lies outside that unit


class _File:
    """A source file's lines with per-line token counts, so any line range is costed in O(1)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.sums = [0, *itertools.accumulate(count_tokens(line) + 1 for line in lines)]

    def cost(self, start: int, end: int) -> int:
        """Estimated tokens of lines start..end joined by line breaks."""
        return self.sums[end + 1] - self.sums[start] - 1

    def blank(self, i: int) -> bool:
        return not self.lines[i].strip()

    def indent(self, i: int) -> int:
        return len(self.lines[i]) - len(self.lines[i].lstrip())

    def trimmed(self, start: int, end: int) -> tuple[int, int] | None:
        """The range without blank lines at either edge; None when it holds only blank lines."""
        while start <= end and self.blank(start):
            start += 1
        while end >= start and self.blank(end):
            end -= 1
        return (start, end) if start <= end else None


def chunk_code(
    source: str, path: str, language: str = "", settings: ChunkSettings = DEFAULT_SETTINGS
) -> list[CodeChunk]:
    """Split `source` (the file at `path`) at function and class boundaries (rules: module docstring)."""
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    file = _File(source.split("\n"))
    span = file.trimmed(0, len(file.lines) - 1)
    if span is None:
        return []
    units = _python_units(file, source, span) if language == "python" else None
    if units is None:
        units = _indent_units(file, *span, ())
    chunker = _Chunker(file, path, language, settings)
    groups = chunker.plan(units)
    chunks = [piece for group in groups for piece in chunker.render(group)]
    return [
        CodeChunk(seq, c.heading_path, c.text, c.n_tokens, c.start_line, c.end_line)
        for seq, c in enumerate(chunks)
    ]


def chunk_code_document(text: str, path: str, settings: ChunkSettings = DEFAULT_SETTINGS) -> list[CodeChunk]:
    """Chunk a code document as `sources.text.code_to_markdown` stored it (a `# path` heading, one fenced block)."""
    unwrapped = unwrap_code_document(text)
    if unwrapped is None:
        return chunk_code(text, path, "", settings)
    language, source = unwrapped
    return chunk_code(source, path, language, settings)


def unwrap_code_document(text: str) -> tuple[str, str] | None:
    """(language, source) of a `# path` heading over one fenced block; None for any other text."""
    heading, _, body = text.partition("\n\n")
    lines = body.split("\n")
    opening = _WRAPPED_FENCE.fullmatch(lines[0])
    if not heading.startswith("# ") or "\n" in heading or opening is None or len(lines) < 2:
        return None
    if lines[-1] != opening[1]:
        return None
    return opening[2].strip(), "\n".join(lines[1:-1])


def line_permalink(url: str, start_line: int, end_line: int) -> str:
    """`url` pointing at a line range: GitHub `#L10-L42`, GitLab `#L10-42`, Bitbucket `#lines-10:42`, else `#L10-L42`."""
    host = (urlsplit(url).hostname or "").removeprefix("www.")
    single = start_line == end_line
    if host == "bitbucket.org":
        anchor = f"lines-{start_line}" if single else f"lines-{start_line}:{end_line}"
    elif host == "gitlab.com":
        anchor = f"L{start_line}" if single else f"L{start_line}-{end_line}"
    else:
        anchor = f"L{start_line}" if single else f"L{start_line}-L{end_line}"
    # a file URL of a repository without a known host already carries `#commit=<sha>`; keep it
    return f"{url}&{anchor}" if "#" in url else f"{url}#{anchor}"


# --- Python: the standard library's parser ---------------------------------------------------------------


def _python_units(file: _File, source: str, span: tuple[int, int]) -> list[_Unit] | None:
    """Top-level units of a Python file; None when it does not parse (the indentation rules take over)."""
    try:
        with warnings.catch_warnings():  # e.g. "invalid escape sequence": the user's code, not ours to report
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not tree.body:
        return [_Unit(*span, ())]
    return _statement_units(file, tree.body, [], *span, ())


def _first_line(node: ast.stmt) -> int:
    """0-based first line of a statement, its decorators included."""
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)]) - 1


def _python_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    if isinstance(node, ast.AsyncFunctionDef):
        return f"async def {node.name}"
    if isinstance(node, ast.FunctionDef):
        return f"def {node.name}"
    return None


def _statement_units(
    file: _File,
    body: Sequence[ast.stmt],
    lead: list[tuple[int, int]],
    first: int,
    last: int,
    names: tuple[str, ...],
) -> list[_Unit]:
    """Units for `body` (after `lead`, a header span) covering lines first..last; statements sharing a line merge."""
    spans = list(lead)
    nodes: list[ast.stmt | None] = [None] * len(lead)
    for node in body:
        start, end = _first_line(node), (node.end_lineno or node.lineno) - 1
        if spans and start <= spans[-1][1]:
            spans[-1], nodes[-1] = (spans[-1][0], max(end, spans[-1][1])), None
        else:
            spans.append((start, end))
            nodes.append(node)
    units = []
    for (start, end), statement in zip(_cover(file, spans, first, last), nodes, strict=True):
        name = _python_name(statement) if statement is not None else None
        if statement is None or name is None:
            units.append(_Unit(start, end, names))
            continue
        unit_names = (*names, name)
        parts = _python_parts(file, statement, start, end, unit_names)
        units.append(_Unit(start, end, unit_names, definition=True, parts=parts))
    return units


def _python_parts(
    file: _File, node: ast.stmt, start: int, end: int, names: tuple[str, ...]
) -> Callable[[], list[_Unit]] | None:
    """A definition's parts: its header (decorators and signature), then its body's statements."""
    body: list[ast.stmt] = getattr(node, "body", [])
    body_first = _first_line(body[0])
    if body_first <= node.lineno - 1:  # `def f(): return 1`: nothing to split at
        return None
    header_end = body_first - 1
    while header_end > node.lineno - 1 and (
        file.blank(header_end) or file.lines[header_end].lstrip()[:1] == "#"
    ):
        header_end -= 1
    return lambda: _statement_units(file, body, [(start, header_end)], start, end, names)


def _cover(file: _File, spans: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """Stretch spans over first..last (`first` is not blank): lines right above a span join it, the rest of a
    gap joins the span before."""
    covered: list[tuple[int, int]] = []
    for start, end in spans:
        if not covered:
            covered.append((first, end))
            continue
        gap_start, top = covered[-1][1] + 1, start
        while top > gap_start and not file.blank(top - 1):
            top -= 1
        if (before := file.trimmed(gap_start, top - 1)) is not None:
            covered[-1] = (covered[-1][0], before[1])
        covered.append((top, end))
    if covered and (after := file.trimmed(covered[-1][1] + 1, last)) is not None:
        covered[-1] = (covered[-1][0], after[1])
    return covered


# --- Every other language: indentation ---------------------------------------------------------------------


def _indent_units(
    file: _File, first: int, last: int, names: tuple[str, ...], level: int | None = None
) -> list[_Unit]:
    """Blocks of lines first..last at `level` (default: their least indent), named after what they define."""
    code = [i for i in range(first, last + 1) if not file.blank(i)]
    if not code:
        return []
    level = min(file.indent(i) for i in code) if level is None else level
    starts = [code[0]]
    for previous, i in itertools.pairwise(code):
        at_level = file.indent(i) <= level and not _CONTINUES.match(file.lines[i])
        after_break = i > previous + 1 or file.indent(previous) > level or _CLOSER.match(file.lines[previous])
        if at_level and after_break:
            starts.append(i)
    units = []
    for start, following in zip(starts, [*starts[1:], last + 1], strict=True):
        end = following - 1
        while file.blank(end):  # stops at `start`, which is not blank
            end -= 1
        units.append(_indent_unit(file, start, end, names))
    return units


def _indent_unit(file: _File, start: int, end: int, names: tuple[str, ...]) -> _Unit:
    """One block, named after what its first code line defines, if anything."""
    name = _block_name(file, start, end)
    unit_names = (*names, name) if name else names
    return _Unit(start, end, unit_names, name is not None, _indent_parts(file, start, end, unit_names))


def _indent_parts(file: _File, start: int, end: int, names: tuple[str, ...]) -> Callable[[], list[_Unit]]:
    """A block's parts: the lines before its indented body, then the body's blocks (the last one closing it)."""

    def parts() -> list[_Unit]:
        head = next((i for i in range(start, end + 1) if not _is_decoration(file, i)), None)
        if head is None:
            return []
        deeper = [i for i in range(head, end + 1) if not file.blank(i) and file.indent(i) > file.indent(head)]
        if not deeper:
            return []
        level = min(file.indent(i) for i in deeper)
        header = file.trimmed(start, deeper[0] - 1)
        footer = file.trimmed(deeper[-1] + 1, end)
        inner = _indent_units(file, deeper[0], deeper[-1], names, level)
        if footer:  # closing lines (`}`, `end`) go with the last inner block, which keeps its name
            inner[-1] = _indent_unit(file, inner[-1].start, footer[1], names)
        return [*([_Unit(*header, names)] if header else []), *inner]

    return parts


def _is_decoration(file: _File, i: int) -> bool:
    """Blank, comment and attribute lines, which come before the line that says what a block is."""
    line = file.lines[i]
    return file.blank(i) or bool(_COMMENT.match(line) or _ATTRIBUTE.match(line))


def _block_name(file: _File, start: int, end: int) -> str | None:
    """`func Save`, `class Store`, `main()` or `create table users` when the block's first code line defines it."""
    head = next((i for i in range(start, end + 1) if not _is_decoration(file, i)), None)
    if head is None:
        return None
    line = file.lines[head][:_NAME_SCAN_CHARS]
    if match := _KEYWORD_DEFINITION.match(line):
        return f"{match[1]} {match[2]}"
    if match := _VARIABLE_FUNCTION.match(line):
        return f"function {match[1]}"
    if match := _SQL_DEFINITION.match(line):
        return f"create {match[1].lower()} {match[2]}"
    if match := _SHELL_FUNCTION.match(line):
        return f"{match[1]}()"
    match = _SIGNATURE.match(line)
    if match and "=" not in line[: match.end()] and _is_type(match[1]):
        return f"{match[2]}()"
    return None


def _is_type(words: str) -> bool:
    """Whether the words before a `name(` look like a return type, not a statement."""
    first = words.split()[0]
    return first not in _NOT_A_TYPE and "." not in words


# --- Packing and rendering -----------------------------------------------------------------------------------


class _Chunker:
    """Packs units into groups that fit the target and renders groups as chunks."""

    def __init__(self, file: _File, path: str, language: str, settings: ChunkSettings) -> None:
        self.file, self.path, self.language, self.settings = file, path, language, settings
        self.fence_tokens = count_tokens(fenced("x", language)) - 1  # both fence lines and their line breaks
        self.rooms: dict[tuple[str, ...], int] = {}

    def heading(self, names: tuple[str, ...]) -> str:
        return "# " + " > ".join((self.path, *names))

    def room(self, names: tuple[str, ...]) -> int:
        """Tokens left for code lines under the heading for `names`."""
        if names not in self.rooms:
            overhead = count_tokens(self.heading(names)) + 1 + self.fence_tokens
            self.rooms[names] = max(self.settings.target_tokens - overhead, 1)
        return self.rooms[names]

    def fits(self, start: int, end: int, names: tuple[str, ...]) -> bool:
        return self.file.cost(start, end) <= self.room(names)

    def plan(self, units: list[_Unit], depth: int = 0) -> list[_Group]:
        """Groups for sibling units: definitions alone, small units packed, oversized units split."""
        groups: list[_Group] = []
        for unit in units:
            last = groups[-1] if groups else None
            if not self.fits(unit.start, unit.end, unit.names):
                groups += [replace(group, open=False, sealed=True) for group in self.split(unit, depth)]
            elif unit.definition and self.file.cost(unit.start, unit.end) >= self.settings.min_tokens:
                groups.append(_Group(unit.start, unit.end, unit.names))
            elif (
                last
                and last.open
                and self.fits(last.start, unit.end, names := _shared(last.names, unit.names))
            ):
                groups[-1] = _Group(last.start, unit.end, names, open=True)
            else:
                groups.append(_Group(unit.start, unit.end, unit.names, open=True))
        return self.merge_leftovers(groups)

    def split(self, unit: _Unit, depth: int) -> list[_Group]:
        """An oversized unit as groups: by its parts when it has several (and nesting allows), else by lines."""
        parts = unit.parts() if unit.parts and depth < _MAX_SPLIT_DEPTH else []
        if len(parts) > 1:
            return self.plan(parts, depth + 1)
        return [
            _Group(s, e, unit.names) for s, e in self.line_pieces(unit.start, unit.end, self.room(unit.names))
        ]

    def line_pieces(self, start: int, end: int, room: int) -> list[tuple[int, int]]:
        """Lines start..end packed into ranges within `room` tokens, cut at blank lines where possible."""
        pieces: list[tuple[int, int]] = []
        for is_blank, numbers in itertools.groupby(range(start, end + 1), self.file.blank):
            if is_blank:
                continue
            block = list(numbers)
            whole = self.file.cost(block[0], block[-1]) <= room
            for s, e in [(block[0], block[-1])] if whole else [(i, i) for i in block]:
                if pieces and self.file.cost(pieces[-1][0], e) <= room:
                    pieces[-1] = (pieces[-1][0], e)
                else:
                    pieces.append((s, e))
        return pieces

    def merge_leftovers(self, groups: list[_Group]) -> list[_Group]:
        """Merge each group under min_tokens into the previous (else the next) group when the two fit."""
        merged: list[_Group] = []
        for group in groups:
            last = merged[-1] if merged else None
            mergeable = last is not None and not (last.sealed or group.sealed)
            if (
                last is not None
                and mergeable
                and min(self.cost(last), self.cost(group)) < self.settings.min_tokens
            ):
                names = _shared(last.names, group.names)
                if self.fits(last.start, group.end, names):
                    merged[-1] = _Group(last.start, group.end, names)
                    continue
            merged.append(group)
        return merged

    def cost(self, group: _Group) -> int:
        return self.file.cost(group.start, group.end)

    def render(self, group: _Group) -> list[CodeChunk]:
        """The chunk for `group`, cut again by lines (a lone line by tokens) if the estimate fell short."""
        code = "\n".join(self.file.lines[group.start : group.end + 1])
        chunk = self.chunk(group.start, group.end, group.names, code)
        excess = chunk.n_tokens - self.settings.target_tokens
        if excess <= 0 or self.room(group.names) < _MIN_ROOM:
            return [chunk]
        if group.start == group.end:
            return self.token_pieces(group.start, group.names)
        room = max(self.cost(group) - excess - 1, 1)
        pieces = self.line_pieces(group.start, group.end, room)
        return [c for s, e in pieces for c in self.render(_Group(s, e, group.names))]

    def token_pieces(self, line: int, names: tuple[str, ...]) -> list[CodeChunk]:
        """A line too long for any chunk (minified code, a data blob), cut into pieces that fit."""
        rest, chunks = self.file.lines[line], []
        while rest:
            limit = self.room(names)
            while True:  # tokens can merge across the fence's line breaks; shrink until the piece fits
                head = _token_prefix(rest, limit)
                chunk = self.chunk(line, line, names, head)
                if chunk.n_tokens <= self.settings.target_tokens or limit == 1:
                    break
                limit = max(limit - (chunk.n_tokens - self.settings.target_tokens), 1)
            chunks.append(chunk)
            rest = rest[len(head) :]
        return chunks

    def chunk(self, start: int, end: int, names: tuple[str, ...], code: str) -> CodeChunk:
        text = f"{self.heading(names)}\n\n{fenced(code, self.language)}"
        return CodeChunk(0, (self.path, *names), text, count_tokens(text), start + 1, end + 1)


def _token_prefix(text: str, limit: int) -> str:
    """The longest start of `text` of at most `limit` tokens (at least one character)."""
    head = truncate_tokens(text[: limit * _WINDOW_CHARS_PER_TOKEN], limit)
    while head and not text.startswith(head):  # a cut inside a multi-byte character decodes to U+FFFD
        head = head[:-1]
    return head or text[0]


def _shared(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """The names two units share (their common enclosing definitions)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
