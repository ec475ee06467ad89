"""Convert one file's bytes to clean Markdown-ish text, or say why it was skipped."""

import io
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import docutils.core
from bs4 import BeautifulSoup, Tag
from docutils import nodes
from markdownify import MarkdownConverter

from finetune_kit.errors import NestingTooDeep

DOC_FORMATS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdx": "markdown",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".txt": "text",
}
CODE_LANGUAGES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".tsx": "tsx", ".jsx": "jsx",
    ".go": "go", ".rs": "rust", ".java": "java", ".rb": "ruby", ".sh": "bash", ".c": "c", ".h": "c",
    ".cpp": "cpp", ".cs": "csharp", ".kt": "kotlin", ".swift": "swift", ".php": "php", ".scala": "scala",
    ".sql": "sql", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json",
}  # fmt: skip
BINARY_SNIFF_BYTES = 8192
# The converters walk a document's tree recursively (markdownify ~3 frames per tag, docutils ~6-9 per level), so a
# file nested deeper than this is skipped before it is walked; real documents stay far below both.
MAX_HTML_DEPTH = 128
MAX_RST_DEPTH = 48

_FRONT_MATTER = re.compile(r"\A---\n([\w-]+[ \t]*:.*?)\n(?:---|\.\.\.)\n", re.S)  # starts with a YAML key
_FRONT_MATTER_TITLE = re.compile(r"^title:\s*(.+?)\s*$", re.M)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_JSX_ONLY = re.compile(r"^\s*(?:</?>|</?[A-Za-z][\w.:-]*(?:\s[^<>]*)?/?>|\{/\*.*\*/\})+\s*$")
_JSX_OPEN = re.compile(r"^\s*<[A-Z][\w.]*(?:\s[^>]*)?$")
_ES_STATEMENT = re.compile(r"^(?:import|export)\b")
_RST_CODE_DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)\.\.[ \t]+(?:code-block|sourcecode|code)::(?P<lang>.*)\n"
    r"(?:(?P=indent)[ \t]+:[\w-]+:.*\n)*",
    re.M,
)
_RST_ROLE = re.compile(r"^:(?P<role>[\w:.+-]+):`(?P<body>.*)`$", re.S)
_CODE_ROLES = ("func", "meth", "class", "mod", "attr", "obj", "exc", "data", "code", "const")
_SKIPPED_HTML_TAGS = ["script", "style", "nav", "footer", "noscript", "template"]
_HTML_LANGUAGE_CLASS = re.compile(r"^(?:language|lang|highlight)-([\w+#.-]+)$")
_RST_LIST_MARKERS = re.compile(r"(?:(?:[-*+\u2022\u2023\u2043]|\(?(?:\d{1,9}|#|[A-Za-z]{1,4})[.)])[ \t]+)*")


def to_text(path: str, raw: bytes, include_code: bool) -> tuple[str, str] | str:
    """Return (clean_text, format) for one file, or the reason it was skipped."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in CODE_LANGUAGES and not include_code:
        return f"code file (include it with --include '*{suffix}' or --code)"
    if suffix not in DOC_FORMATS and suffix not in CODE_LANGUAGES:
        return f"unknown file type '{suffix}'" if suffix else "unknown file type (no extension)"
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        return "binary file"
    try:
        source = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not valid UTF-8 text"
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    try:
        text, fmt = _convert(path, suffix, source)
    except NestingTooDeep as exc:
        return str(exc)
    except RecursionError:  # the last line of defence: a structure the depth checks do not foresee
        return "nested too deeply to convert — flatten it, or leave it out with --exclude"
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    if not text.strip():
        return "empty after conversion"
    return text, fmt


def _convert(path: str, suffix: str, source: str) -> tuple[str, str]:
    """Dispatch on the file extension; the extension is known to be supported."""
    if suffix in CODE_LANGUAGES:
        return code_to_markdown(path, source, CODE_LANGUAGES[suffix]), "code"
    fmt = DOC_FORMATS[suffix]
    converters: dict[str, Callable[[str], str]] = {
        "markdown": mdx_to_markdown if suffix == ".mdx" else strip_front_matter,
        "rst": rst_to_markdown,
        "html": html_to_markdown,
        "text": lambda text: text,
    }
    return converters[fmt](source), fmt


def fenced(code: str, language: str = "") -> str:
    """Wrap code in a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code.rstrip(chr(10))}\n{fence}"


def code_to_markdown(path: str, source: str, language: str) -> str:
    """Render a source file as a fenced block under a heading naming its path."""
    return f"# {path}\n\n{fenced(source, language)}"


def strip_front_matter(markdown: str) -> str:
    """Drop YAML front matter, keeping its title as a heading when the body has none."""
    match = _FRONT_MATTER.match(markdown)
    if not match:
        return markdown
    body = markdown[match.end() :].lstrip("\n")
    title = _FRONT_MATTER_TITLE.search(match.group(1))
    if title and not re.search(r"^# ", body, re.M):
        return f"# {title.group(1).strip(chr(34) + chr(39))}\n\n{body}"
    return body


def mdx_to_markdown(mdx: str) -> str:
    """Drop MDX import/export statements and JSX-only lines; keep Markdown and fenced code intact."""
    kept: list[str] = []
    fence = ""
    open_brackets = 0  # inside a multi-line import/export statement
    in_jsx_tag = False  # inside a JSX opening tag split over several lines
    for line in strip_front_matter(mdx).split("\n"):
        fence_match = _FENCE.match(line)
        if fence:
            kept.append(line)
            fence = "" if fence_match and fence_match.group(1).startswith(fence) else fence
        elif open_brackets:
            open_brackets = _bracket_depth(line, open_brackets)
        elif in_jsx_tag:
            in_jsx_tag = not line.rstrip().endswith(">")
        elif _ES_STATEMENT.match(line):
            open_brackets = _bracket_depth(line, 0)
        elif _JSX_OPEN.match(line):
            in_jsx_tag = True
        elif not _JSX_ONLY.match(line) and (line.strip() or (kept and kept[-1].strip())):
            # blank lines are collapsed because dropped statements and tags leave runs of them
            fence = fence_match.group(1) if fence_match else ""
            kept.append(line)
    return "\n".join(kept)


def _bracket_depth(line: str, depth: int) -> int:
    """Update how many brackets are open after one line of a JavaScript statement."""
    return max(0, depth + sum(line.count(c) for c in "{([") - sum(line.count(c) for c in "})]"))


def html_to_markdown(html: str) -> str:
    """Convert HTML to Markdown: ATX headings, fenced code, no scripts, styles or navigation."""
    soup = BeautifulSoup(html, "html.parser")
    if (depth := _html_depth(soup)) > MAX_HTML_DEPTH:
        raise NestingTooDeep(
            f"HTML nested {depth} tags deep (the limit is {MAX_HTML_DEPTH}) — flatten it, or leave it out with --exclude"
        )
    for tag in soup.find_all(_SKIPPED_HTML_TAGS):
        tag.decompose()
    for anchor in soup.select("a.headerlink"):
        anchor.decompose()
    main = soup.find("main") or soup.find(role="main") or soup.body or soup
    converter = MarkdownConverter(
        heading_style="ATX",
        bullets="-",
        escape_underscores=False,
        escape_asterisks=False,
        code_language_callback=_html_code_language,
    )
    return re.sub(r"\n{3,}", "\n\n", converter.convert_soup(main))


def _html_depth(soup: BeautifulSoup) -> int:
    """How deeply tags nest, counted without recursion (the parser builds any depth; walkers cannot)."""
    deepest, stack = 0, list[tuple[Tag, int]]([(soup, 0)])
    while stack:
        tag, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in tag.children if isinstance(child, Tag))
    return deepest


def _html_code_language(pre: Tag) -> str:
    """Find a code block's language in `language-x` / `highlight-x` classes on it or around it."""
    candidates = [pre.find("code"), pre, pre.parent, pre.parent.parent if pre.parent else None]
    for element in candidates:
        for css_class in element.get_attribute_list("class") if isinstance(element, Tag) else []:
            match = _HTML_LANGUAGE_CLASS.match(css_class)
            if match:
                return match.group(1)
    return ""


def rst_to_markdown(rst: str) -> str:
    """Parse reStructuredText with docutils (silently) and render the doctree as Markdown."""
    if (depth := _rst_depth(rst)) > MAX_RST_DEPTH:
        raise NestingTooDeep(
            f"reStructuredText nested {depth} levels deep (the limit is {MAX_RST_DEPTH}) — flatten it, "
            "or leave it out with --exclude"
        )
    source = _RST_CODE_DIRECTIVE.sub(r"\g<indent>.. code::\g<lang>\n", rst)
    settings = {
        "report_level": 5,
        "halt_level": 5,
        "exit_status_level": 5,
        "warning_stream": io.StringIO(),
        "doctitle_xform": False,
        "docinfo_xform": False,
        "sectsubtitle_xform": False,
        "syntax_highlight": "none",
        "file_insertion_enabled": False,
        "raw_enabled": False,
        "_disable_config": True,
    }
    doctree = docutils.core.publish_doctree(source, settings_overrides=settings)
    return _rst_blocks(doctree.children, 1)


def _rst_depth(rst: str) -> int:
    """An upper bound on reST nesting: the stack of indents (quotes, directives, list bodies) plus the list
    markers stacked at the start of one line (`- - - x` is three nested lists)."""
    deepest, indents = 0, list[int]()
    for line in rst.split("\n"):
        body = line.lstrip()
        if not body:
            continue
        indent = len(line) - len(body)
        while indents and indents[-1] >= indent:
            indents.pop()
        indents.append(indent)
        markers = _RST_LIST_MARKERS.match(body)
        stacked = len(re.findall(r"[ \t]+", markers.group())) if markers else 0
        deepest = max(deepest, len(indents) + stacked)
    return deepest


_RST_SKIPPED = (
    nodes.comment, nodes.substitution_definition, nodes.target, nodes.system_message,
    nodes.raw, nodes.image, nodes.pending, nodes.decoration,
)  # fmt: skip


def _rst_blocks(children: list[nodes.Node], level: int) -> str:
    """Render a run of block-level nodes, separated by blank lines."""
    rendered = (_rst_block(child, level) for child in children)
    return "\n\n".join(block for block in rendered if block.strip())


def _rst_block(node: nodes.Node, level: int) -> str:
    """Render one block-level node at a section nesting level."""
    if isinstance(node, _RST_SKIPPED) or (isinstance(node, nodes.topic) and "contents" in node["classes"]):
        return ""
    for node_types, render in _RST_RENDERERS:
        if isinstance(node, node_types):
            return render(node, level)
    if isinstance(node, nodes.TextElement):
        return _rst_inline(node)
    return _rst_blocks(node.children, level) if isinstance(node, nodes.Element) else node.astext()


def _rst_section(node: nodes.Element, level: int) -> str:
    """Render a section as a heading whose depth is its nesting level."""
    heading = f"{'#' * min(level, 6)} {_rst_inline(node[0])}"
    body = _rst_blocks(node.children[1:], level + 1)
    return f"{heading}\n\n{body}" if body else heading


def _rst_code(node: nodes.Element, level: int) -> str:
    """Render a literal, code or doctest block as a fenced block."""
    if isinstance(node, nodes.doctest_block):
        return fenced(node.astext(), "python")
    languages = [css_class for css_class in node.get("classes", []) if css_class != "code"]
    return fenced(node.astext(), languages[0] if languages else "")


def _rst_labelled(node: nodes.Element, level: int) -> str:
    """Render a definition-list item or field as a bold term over its body."""
    term, *body = node.children
    return f"**{_rst_inline(term)}**\n{_rst_blocks(body, level)}"


def _rst_note(node: nodes.Element, level: int) -> str:
    """Render a footnote or citation as `[label] text`."""
    label, *body = node.children
    return f"[{label.astext()}] {_rst_blocks(body, level)}"


def _rst_list(node: nodes.Element, level: int) -> str:
    """Render a bullet or enumerated list, indenting each item's continuation lines."""
    items = []
    for number, item in enumerate(node.children, start=node.get("start", 1)):
        marker = "- " if isinstance(node, nodes.bullet_list) else f"{number}. "
        body = _indent(_rst_blocks(item.children, level), " " * len(marker))
        items.append(marker + body[len(marker) :])
    return "\n".join(items)


def _rst_admonition(node: nodes.Element, level: int) -> str:
    """Render a note/warning/... as a block quote that starts with its kind in bold."""
    children = list(node.children)
    if children and isinstance(children[0], nodes.title):
        label = _rst_inline(children.pop(0))
    else:
        label = type(node).__name__.capitalize()
    separator = " " if children and isinstance(children[0], nodes.paragraph) else "\n\n"
    return _indent(f"**{label}:**{separator}{_rst_blocks(children, level)}", "> ")


def _rst_table(node: nodes.Element) -> str:
    """Render a table as a Markdown pipe table whose first row is the header."""
    rows = [
        [_rst_blocks(entry.children, 1).replace("\n", " ") for entry in row.children]
        for row in node.findall(nodes.row)
    ]
    if not rows:
        return ""
    lines = ["| " + " | ".join(cells) + " |" for cells in rows]
    lines.insert(1, "|" + " --- |" * len(rows[0]))
    titles = [f"**{_rst_inline(child)}**\n" for child in node.children if isinstance(child, nodes.title)]
    return "\n".join(titles + lines)


_RST_RENDERERS: list[tuple[type | tuple[type, ...], Callable[[Any, int], str]]] = [
    (nodes.section, _rst_section),
    ((nodes.literal_block, nodes.doctest_block), _rst_code),
    ((nodes.bullet_list, nodes.enumerated_list), _rst_list),
    (nodes.Admonition, _rst_admonition),
    (nodes.block_quote, lambda node, level: _indent(_rst_blocks(node.children, level), "> ")),
    (nodes.table, lambda node, level: _rst_table(node)),
    ((nodes.definition_list_item, nodes.field), _rst_labelled),
    ((nodes.footnote, nodes.citation), _rst_note),
    (nodes.line_block, lambda node, level: "\n".join(_rst_inline(line) for line in node.findall(nodes.line))),
    (nodes.transition, lambda node, level: "---"),
    ((nodes.title, nodes.rubric), lambda node, level: f"**{_rst_inline(node)}**"),
]


def _rst_inline(node: nodes.Node) -> str:
    """Render inline markup: emphasis, literals, links; unknown Sphinx roles become their text."""
    parts = []
    for child in node.children:
        if isinstance(child, nodes.Text):
            parts.append(str(child))
        elif isinstance(child, nodes.emphasis):
            parts.append(f"*{_rst_inline(child)}*")
        elif isinstance(child, nodes.strong):
            parts.append(f"**{_rst_inline(child)}**")
        elif isinstance(child, nodes.literal):
            parts.append(f"`{child.astext()}`")
        elif isinstance(child, nodes.reference):
            text, uri = _rst_inline(child), child.get("refuri", "")
            parts.append(f"[{text}]({uri})" if uri and uri != text else text)
        elif isinstance(child, nodes.problematic):
            parts.append(_sphinx_role_text(child.astext()))
        elif isinstance(child, nodes.footnote_reference | nodes.citation_reference):
            parts.append(f"[{child.astext()}]")
        elif not isinstance(child, _RST_SKIPPED):
            parts.append(_rst_inline(child))
    return "".join(parts)


def _sphinx_role_text(raw: str) -> str:
    """Turn an unknown role such as :ref:`Install <install>` or :func:`~a.b` into readable text."""
    match = _RST_ROLE.match(raw)
    if not match:
        return raw
    body = match.group("body")
    titled = re.match(r"^(.+?)\s*<[^<>]+>$", body, re.S)
    text = titled.group(1) if titled else body.lstrip("~!")
    role = match.group("role").split(":")[-1]
    return f"`{text}`" if role in _CODE_ROLES else text


def _indent(text: str, prefix: str) -> str:
    """Prefix every non-empty line (block quotes prefix empty lines too, so they stay one quote)."""
    if prefix.startswith(">"):
        return "\n".join((prefix + line).rstrip() for line in text.split("\n"))
    return "\n".join(prefix + line if line else line for line in text.split("\n"))
