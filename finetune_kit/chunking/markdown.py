"""Split a Markdown document into heading-aware, token-bounded chunks.

The rules, in order:

1. Structure. Lines are scanned for ATX (`#`) and setext (`===`/`---` under a paragraph) headings outside
   fenced code. A leading `---`/`+++` front-matter block is dropped. A section is a heading plus its own
   body; its heading path is the stack of enclosing headings. A heading with no body of its own lives on
   in its subsections' breadcrumbs, or, with none, as a heading-only section. An unterminated fence runs to
   the end of the document and is closed there.
2. Packing. Whole sections are packed in order into chunks of at most `target_tokens`, never across a
   `#` or `##` heading (a "chapter"); a packed chunk's `heading_path` is the deepest path its sections
   share, and each section inside it keeps its own heading lines.
3. Splitting. A section bigger than the target is cut at blocks (paragraphs, lists, tables, fenced code),
   then list items, lines, sentences, words and, last, tokens. A code block or table cut this way re-opens
   its fence or repeats its header in every piece. Each later piece of a section starts with up to
   `overlap_tokens` of the previous piece's trailing prose (whole lines, sentences or words; never code).
4. Small chunks. A chunk under `min_tokens` is merged into the previous chunk, else the next, when both
   are under the same `#` heading and the result fits the target. Three or more small chunks in a row (a
   glossary, FAQ or changelog of one-line `#` sections) are merged across `#` headings too, under the heading
   path they share. Otherwise a chunk is kept as it is.

Every chunk starts with its heading lines, and `n_tokens` counts the whole text. Sizes are planned with
per-block token counts (each block is counted once), so chunking stays linear in the document size.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial

from finetune_kit.errors import ChunkingError
from finetune_kit.tokens import count_tokens, truncate_tokens

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
_SETEXT = re.compile(r" {0,3}(?:=+|-+)[ \t]*")
_FENCE = re.compile(r"([ \t]*)(`{3,}|~{3,})(.*)")
_NOT_PARAGRAPH = re.compile(r"(?:>|[-*+](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$)|<|\|)")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_TABLE_DELIMITER = re.compile(r"[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*")
_FRONT_MATTER_CLOSE = {"---": ("---", "..."), "+++": ("+++",)}
_WINDOW_CHARS_PER_TOKEN = 4  # a window this long rarely holds fewer tokens than wanted; short pieces re-pack


@dataclass(frozen=True)
class ChunkSettings:
    """Chunk size, overlap between pieces of a split section, and the size below which chunks are merged."""

    target_tokens: int = 512
    overlap_tokens: int = 64
    min_tokens: int = 40

    def __post_init__(self) -> None:
        target = self.target_tokens
        if target < 32:
            raise ChunkingError(f"target_tokens is {target} but must be at least 32; raise target_tokens.")
        if not 0 <= self.overlap_tokens < target:
            raise ChunkingError(
                f"overlap_tokens is {self.overlap_tokens} but must be from 0 to {target - 1} "
                f"(below target_tokens={target}); set overlap_tokens in that range."
            )
        if not 0 <= self.min_tokens <= target:
            raise ChunkingError(
                f"min_tokens is {self.min_tokens} but must be from 0 to {target} "
                f"(at most target_tokens={target}); set min_tokens in that range."
            )


DEFAULT_SETTINGS = ChunkSettings()


@dataclass(frozen=True)
class Chunk:
    """One self-contained piece of a document: its heading lines, then body text."""

    seq: int
    heading_path: tuple[str, ...]
    text: str
    n_tokens: int


@dataclass(eq=False)
class _Wrap:
    """The lines that re-open (head) and close (tail) a code block or table cut across chunks."""

    head: str
    tail: str
    tokens: int


@dataclass(frozen=True, eq=False)
class _Atom:
    """The unit the packer moves: a whole block, or one piece of an oversized block."""

    joiner: str  # whitespace that joins it to the previous atom
    text: str
    tokens: int  # includes the joiner
    code: bool = False
    wrap: _Wrap | None = None


@dataclass(frozen=True, eq=False)
class _Heading:
    """One heading on the stack (compared by identity), with its `#` line and that line's token count."""

    level: int
    title: str
    line: str
    tokens: int


@dataclass(frozen=True, eq=False)
class _Section:
    """A heading's own body as block atoms, with the headings that enclose it."""

    headings: tuple[_Heading, ...]
    chapter: int
    top: int
    blocks: tuple[_Atom, ...]

    def head_cost(self, shared: int) -> int:
        """Tokens of the heading lines below the first `shared` levels, with their line breaks."""
        return sum(h.tokens + 1 for h in self.headings[shared:])


@lru_cache(maxsize=64)
def _whitespace_tokens(joiner: str) -> int:
    return count_tokens(joiner)


def _atom(joiner: str, text: str, code: bool = False, wrap: _Wrap | None = None) -> _Atom:
    """An atom whose token count includes the whitespace joining it to the previous one."""
    if joiner and "\n" not in joiner:
        return _Atom(joiner, text, count_tokens(joiner + text), code, wrap)
    return _Atom(joiner, text, count_tokens(text) + _whitespace_tokens(joiner), code, wrap)


def _shared(a: _Section, b: _Section) -> int:
    """How many enclosing headings two sections share (by identity, since titles may repeat)."""
    n = 0
    while n < min(len(a.headings), len(b.headings)) and a.headings[n] is b.headings[n]:
        n += 1
    return n


def _lines(text: str) -> list[str]:
    """Lines with normalised line endings and no trailing whitespace or byte-order mark."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return [line.rstrip() for line in text.split("\n")]


def _strip_front_matter(lines: list[str]) -> list[str]:
    """`lines` without a leading YAML (`---`) or TOML (`+++`) front-matter block."""
    closers = _FRONT_MATTER_CLOSE.get(lines[0]) if lines else None
    if closers is None:
        return lines
    for i in range(1, len(lines)):
        if lines[i] in closers:
            return lines[i + 1 :]
    return lines


def _open_fence(line: str) -> tuple[str, int] | None:
    """(fence character, fence length) when `line` opens a fenced code block."""
    match = _FENCE.fullmatch(line)
    if match is None or (match[2][0] == "`" and "`" in match[3]):
        return None
    return match[2][0], len(match[2])


def _closes_fence(line: str, fence: tuple[str, int]) -> bool:
    """Whether `line` closes a fence opened with `fence`."""
    mark = line.strip()
    return len(mark) >= fence[1] and mark == fence[0] * len(mark)


def _atx_title(raw: str | None) -> str:
    """An ATX heading's text without its optional closing `#`s."""
    return _ATX_CLOSING.sub("", (raw or "").strip()).strip()


def _is_setext_text(paragraph: list[str]) -> bool:
    """Whether these lines form a plain paragraph, which a `===`/`---` line turns into a heading."""
    if not paragraph or len(paragraph[0]) - len(paragraph[0].lstrip()) > 3:
        return False
    return not any(_NOT_PARAGRAPH.match(line.lstrip()) for line in paragraph)


class _Scanner:
    """Reads Markdown lines into sections of blocks, tracking fences and the heading stack."""

    def __init__(self) -> None:
        self.sections: list[_Section] = []
        self.stack: list[_Heading] = []
        self.blocks: list[_Atom] = []
        self.paragraph: list[str] = []
        self.fence_lines: list[str] = []
        self.fence: tuple[str, int] | None = None
        self.chapter = self.top = 0
        self.seen_top_heading = False  # the preamble belongs to the first `#` section

    def feed(self, line: str) -> None:
        """Consume one line."""
        if self.fence is not None:
            self.fence_lines.append(line)
            if _closes_fence(line, self.fence):
                self._end_fence()
        elif not line.strip():
            self._end_paragraph()
        elif (fence := _open_fence(line)) is not None:
            self._end_paragraph()
            self.fence, self.fence_lines = fence, [line]
        elif (atx := _ATX.fullmatch(line)) is not None:
            self._heading(len(atx[1]), _atx_title(atx[2]))
        elif _SETEXT.fullmatch(line) and _is_setext_text(self.paragraph):
            title = " ".join(part.strip() for part in self.paragraph)
            self.paragraph = []
            self._heading(1 if "=" in line else 2, title)
        else:
            self.paragraph.append(line)

    def finish(self) -> list[_Section]:
        """Close any open block and return every section, bodiless ones included."""
        if self.fence is not None:
            while self.fence_lines[-1] == "" and len(self.fence_lines) > 1:
                self.fence_lines.pop()
            opening = self.fence_lines[0]
            indent = opening[: len(opening) - len(opening.lstrip())]
            self.fence_lines.append(indent + self.fence[0] * self.fence[1])
            self._end_fence()
        self._end_paragraph()
        self._end_section()
        return self.sections

    def _end_fence(self) -> None:
        self.blocks.append(_atom("\n\n", "\n".join(self.fence_lines), code=True))
        self.fence, self.fence_lines = None, []

    def _end_paragraph(self) -> None:
        if self.paragraph:
            self.blocks.append(_atom("\n\n", "\n".join(self.paragraph)))
            self.paragraph = []

    def _end_section(self) -> None:
        self.sections.append(_Section(tuple(self.stack), self.chapter, self.top, tuple(self.blocks)))
        self.blocks = []

    def _heading(self, level: int, title: str) -> None:
        self._end_paragraph()
        self._end_section()
        while self.stack and self.stack[-1].level >= level:
            self.stack.pop()
        line = f"{'#' * level} {title}".rstrip()
        self.stack.append(_Heading(level, title, line, count_tokens(line)))
        if level <= 2:
            self.chapter += 1
        if level == 1:
            self.top += 1 if self.seen_top_heading else 0
            self.seen_top_heading = True


_Splitter = Callable[[str, int], list[tuple[str, str]]]


def _split_at(pattern: re.Pattern[str], text: str, budget: int = 0) -> list[tuple[str, str]]:
    """(joiner, piece) pairs of `text` cut at each match of `pattern`; the match becomes the joiner."""
    pairs, start, joiner = [], 0, ""
    for match in pattern.finditer(text):
        pairs.append((joiner, text[start : match.start()]))
        joiner, start = match.group(), match.end()
    pairs.append((joiner, text[start:]))
    return pairs


def _split_items(text: str, budget: int) -> list[tuple[str, str]]:
    """Cut a list block before each item at (or left of) the first item's indent."""
    indent = len(text) - len(text.lstrip(" \t"))
    pattern = re.compile(rf"\n(?=[ \t]{{0,{indent}}}(?:[-*+]|\d{{1,9}}[.)])(?:[ \t]|$))", re.MULTILINE)
    return _split_at(pattern, text)


def _split_tokens(text: str, budget: int) -> list[tuple[str, str]]:
    """Cut into pieces of at most `budget` tokens: the last resort for text without whitespace."""
    pairs, rest, limit = [], text, max(budget - 2, 1)
    while rest:
        head = truncate_tokens(rest[: limit * _WINDOW_CHARS_PER_TOKEN], limit)
        while head and not rest.startswith(head):  # a cut inside a multi-byte character decodes to U+FFFD
            head = head[:-1]
        head = head or rest[0]
        pairs.append(("", head))
        rest = rest[len(head) :]
    return pairs


_split_lines: _Splitter = partial(_split_at, re.compile(r"\n"))
_split_sentences: _Splitter = partial(_split_at, re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]*_`])\s+"))
_split_words: _Splitter = partial(_split_at, re.compile(r"(?<=\S)\s+"))  # leading indentation stays put
_TEXT_CHAIN = (_split_lines, _split_sentences, _split_words, _split_tokens)
_ROW_CHAIN = (_split_words, _split_tokens)


def _fit(atom: _Atom, budget: int, chain: tuple[_Splitter, ...]) -> list[_Atom]:
    """`atom` cut into atoms of at most `budget` tokens, using each splitter in `chain` only as needed."""
    if atom.tokens <= budget or not chain:
        return [atom]
    pairs = chain[0](atom.text, budget)
    if len(pairs) == 1:
        return _fit(atom, budget, chain[1:])
    pieces = [_atom(atom.joiner if i == 0 else j, t, wrap=atom.wrap) for i, (j, t) in enumerate(pairs)]
    return [small for piece in pieces for small in _fit(piece, budget, chain[1:])]


def _is_table(lines: list[str]) -> bool:
    """Whether a block is a pipe table (header row, then a delimiter row)."""
    return len(lines) > 2 and "|" in lines[0] and _TABLE_DELIMITER.fullmatch(lines[1]) is not None


def _explode(block: _Atom, budget: int) -> list[_Atom]:
    """`block` as atoms of at most `budget` tokens; code and table pieces re-open their fence or header."""
    if block.tokens <= budget:
        return [block]
    lines = block.text.split("\n")
    if block.code:
        head, rows, tail = lines[0], lines[1:-1], lines[-1]
    elif _is_table(lines):
        head, rows, tail = "\n".join(lines[:2]), lines[2:], ""
    else:
        prefix: tuple[_Splitter, ...] = (_split_items,) if _LIST_ITEM.match(lines[0]) else ()
        return _fit(block, budget, prefix + _TEXT_CHAIN)
    if not rows:
        return [block]
    wrap = _Wrap(head, tail, count_tokens(head) + count_tokens(tail) + 2)
    row_budget = max(budget - wrap.tokens, 1)
    return [small for row in rows for small in _fit(_atom("\n", row, wrap=wrap), row_budget, _ROW_CHAIN)]


def _wrap_cost(previous: _Atom | None, atom: _Atom) -> int:
    """Tokens of the fence or table header that `atom` must re-open after `previous`."""
    if atom.wrap is None or (previous is not None and previous.wrap is atom.wrap):
        return 0
    return atom.wrap.tokens


@dataclass
class _Draft:
    """A chunk being assembled: consecutive pieces of sections and their estimated token count."""

    chapter: int
    top: int
    pieces: list[tuple[_Section, list[_Atom]]] = field(default_factory=list)
    tokens: int = 0
    small_run: bool = False  # merged from a run of small chunks across `#` headings; more small ones may join

    def cost(self, section: _Section, atom: _Atom) -> int:
        """Estimated tokens that appending `atom` of `section` adds, headings and fences included."""
        if not self.pieces:
            return section.head_cost(0) + _wrap_cost(None, atom) + atom.tokens
        last_section, atoms = self.pieces[-1]
        if last_section is section:
            return _wrap_cost(atoms[-1], atom) + atom.tokens
        shared = _shared(last_section, section)
        return section.head_cost(shared) + 1 + _wrap_cost(None, atom) + atom.tokens

    def add(self, section: _Section, atom: _Atom) -> None:
        """Append `atom` of `section`."""
        self.tokens += self.cost(section, atom)
        if self.pieces and self.pieces[-1][0] is section:
            self.pieces[-1][1].append(atom)
        else:
            self.pieces.append((section, [atom]))


def _section_cost(draft: _Draft, section: _Section) -> int:
    """Estimated tokens that appending all of `section` to `draft` adds."""
    first = section.blocks[0]
    return draft.cost(section, first) - first.tokens + sum(block.tokens for block in section.blocks)


def _flush(drafts: list[_Draft], draft: _Draft, section: _Section) -> _Draft:
    """Keep `draft` if it holds anything, and return an empty draft for `section`'s chapter."""
    if draft.pieces:
        drafts.append(draft)
    return _Draft(section.chapter, section.top)


def _pack(sections: list[_Section], settings: ChunkSettings) -> list[_Draft]:
    """Fill drafts with whole sections of one chapter, streaming sections bigger than the target."""
    target, drafts = settings.target_tokens, list[_Draft]()
    draft = _Draft(-1, -1)
    for section in sections:
        if not draft.pieces or draft.chapter != section.chapter:
            draft = _flush(drafts, draft, section)
        if draft.tokens + _section_cost(draft, section) > target:
            alone = _section_cost(_Draft(section.chapter, section.top), section)
            if alone <= target or draft.tokens >= settings.min_tokens:
                draft = _flush(drafts, draft, section)
            if alone > target:
                draft = _stream(section, draft, drafts, settings)
                continue
        for block in section.blocks:
            draft.add(section, block)
    if draft.pieces:
        drafts.append(draft)
    return drafts


def _stream(section: _Section, draft: _Draft, drafts: list[_Draft], settings: ChunkSettings) -> _Draft:
    """Add an oversized section atom by atom, opening a new draft (with overlap) whenever one is full."""
    target = settings.target_tokens
    budget = max(target - section.head_cost(0), target // 4)
    for atom in (small for block in section.blocks for small in _explode(block, budget)):
        if draft.pieces and draft.tokens + draft.cost(section, atom) > target:
            previous = draft
            draft = _flush(drafts, draft, section)
            if previous.pieces[-1][0] is section:
                room = min(settings.overlap_tokens, target - draft.cost(section, atom) - 1)
                for repeated in _overlap(previous.pieces[-1][1], room):
                    draft.add(section, repeated)
        draft.add(section, atom)
    return draft


def _overlap(atoms: list[_Atom], room: int) -> list[_Atom]:
    """The trailing prose of `atoms` that fits in `room` tokens, stopping at code and table pieces."""
    chosen: list[_Atom] = []
    for atom in reversed(atoms):
        if atom.code or atom.wrap is not None or room <= 0:
            break
        if atom.tokens > room:
            return _tail(atom.text, room) + chosen
        chosen.insert(0, atom)
        room -= atom.tokens
    return chosen


def _tail(text: str, room: int) -> list[_Atom]:
    """The longest run of whole lines, else sentences, else words ending `text` that fits in `room`."""
    for splitter in (_split_lines, _split_sentences, _split_words):
        chosen: list[_Atom] = []
        used = 0
        for joiner, piece in reversed(splitter(text, room)):
            atom = _atom(joiner, piece)
            if used + atom.tokens > room:
                break
            chosen.insert(0, atom)
            used += atom.tokens
        if chosen:
            return chosen
        text = piece
    return []


def _merge_small(drafts: list[_Draft], settings: ChunkSettings) -> list[_Draft]:
    """Merge each draft under min_tokens into the previous (else next) one under the same `#`, if it fits;
    a run of three or more small drafts merges across `#` headings too."""
    merged: list[_Draft] = []
    for i, draft in enumerate(drafts):
        last = merged[-1] if merged else None
        following = drafts[i + 1] if i + 1 < len(drafts) else None
        if last is not None and (across := _merge_kind(last, draft, following, settings)) is not None:
            candidate = _Draft(last.chapter, last.top, small_run=across or last.small_run)
            for section, atoms in last.pieces + draft.pieces:
                for atom in atoms:
                    candidate.add(section, atom)
            if candidate.tokens <= settings.target_tokens:
                merged[-1] = candidate
                continue
        merged.append(draft)
    return merged


def _merge_kind(
    last: _Draft, draft: _Draft, following: _Draft | None, settings: ChunkSettings
) -> bool | None:
    """None: keep apart; False: merge under their `#` heading; True: merge across `#` (a run of small drafts)."""
    minimum = settings.min_tokens
    if min(last.tokens, draft.tokens) < minimum and last.top == draft.top:
        return False
    starts_run = last.tokens < minimum and following is not None and following.tokens < minimum
    if draft.tokens < minimum and (last.small_run or starts_run):
        return True
    return None


def _render_atoms(atoms: list[_Atom]) -> str:
    """Join atoms with their whitespace, re-opening and closing fences and table headers where cut."""
    parts: list[str] = []
    previous: _Atom | None = None
    for atom in atoms:
        if previous is not None and previous.wrap is not None and previous.wrap is not atom.wrap:
            parts.append("\n" + previous.wrap.tail if previous.wrap.tail else "")
        if atom.wrap is not None and (previous is None or previous.wrap is not atom.wrap):
            parts.append(("" if previous is None else "\n\n") + atom.wrap.head + "\n" + atom.text)
        else:
            parts.append(("" if previous is None else atom.joiner) + atom.text)
        previous = atom
    if previous is not None and previous.wrap is not None and previous.wrap.tail:
        parts.append("\n" + previous.wrap.tail)
    return "".join(parts)


def _render(draft: _Draft, seq: int) -> Chunk:
    """The chunk for `draft`: each section's new heading lines, then its body."""
    segments: list[str] = []
    previous: _Section | None = None
    for section, atoms in draft.pieces:
        shared = 0 if previous is None else _shared(previous, section)
        if section.headings[shared:]:
            segments.append("\n".join(h.line for h in section.headings[shared:]))
        if body := _render_atoms(atoms):
            segments.append(body)
        previous = section
    first = draft.pieces[0][0]
    depth = min(_shared(first, section) for section, _ in draft.pieces)
    text = "\n\n".join(segments)
    path = tuple(heading.title for heading in first.headings[:depth])
    return Chunk(seq=seq, heading_path=path, text=text, n_tokens=count_tokens(text))


def _with_content(sections: list[_Section]) -> list[_Section]:
    """Sections with a body, and bodiless headings without subsections (given an empty body)."""
    kept = []
    for section, following in zip(sections, [*sections[1:], None], strict=True):
        if section.blocks:
            kept.append(section)
        elif section.headings and (following is None or section.headings[-1] not in following.headings):
            kept.append(replace(section, blocks=(_atom("\n\n", ""),)))
    return kept


def chunk_markdown(text: str, settings: ChunkSettings = DEFAULT_SETTINGS) -> list[Chunk]:
    """Split Markdown `text` into heading-aware chunks of at most target_tokens (rules: module docstring)."""
    scanner = _Scanner()
    for line in _strip_front_matter(_lines(text)):
        scanner.feed(line)
    drafts = _merge_small(_pack(_with_content(scanner.finish()), settings), settings)
    return [_render(draft, seq) for seq, draft in enumerate(drafts)]
