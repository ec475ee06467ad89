"""Read a directory (or one file) of docs: glob selection, size and readability checks, conversion."""

import itertools
import os
import re
import stat
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path, PurePosixPath

from finetune_kit.errors import SourceError
from finetune_kit.sources import SkippedFile, SourceDocument, SourceItem, SourceIter
from finetune_kit.sources.text import CODE_LANGUAGES, DOC_FORMATS, to_text

MAX_FILE_BYTES = 5 * 1024 * 1024
_GLOB_TOKEN = re.compile(r"\*\*/|\*\*|\*|\?|\[!?\]?[^\]]*\]|.", re.S)
_GLOB_WILDCARDS = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
IGNORED_DIRS = frozenset({"node_modules", "__pycache__"})  # hidden names (".git", ".venv") are skipped too


def iter_directory(
    root: Path,
    include: list[str],
    exclude: list[str],
    url_for: Callable[[str], str] | None = None,
    include_code: bool = False,
) -> SourceIter:
    """Yield every selected file under root (or root itself when it is a file), in sorted path order."""
    if not root.exists():
        raise SourceError(f"{root}: no such file or directory — check the path")
    if root.is_file():
        # a file named on the command line is wanted whatever its type, code included
        return iter([read_source_file(root.parent, root.name, url_for, include_code=True)])
    relpaths, unreadable_dirs = _walk(root)
    return itertools.chain(
        iter_files(root, relpaths, include, exclude, url_for, include_code), unreadable_dirs
    )


def iter_files(
    root: Path,
    relpaths: Iterable[str],
    include: list[str],
    exclude: list[str],
    url_for: Callable[[str], str] | None = None,
    include_code: bool = False,
) -> SourceIter:
    """Yield the selected files among relpaths (POSIX, relative to root), read and converted, sorted."""
    for relpath in sorted(relpaths):
        if is_selected(relpath, include, exclude, include_code):
            code_wanted = include_code or _names_extension(relpath, include)
            yield read_source_file(root, relpath, url_for, code_wanted)


def _walk(root: Path) -> tuple[list[str], list[SkippedFile]]:
    """List files under root as POSIX paths, pruning hidden and ignored dirs; also report unreadable dirs."""
    found: list[str] = []
    unreadable: list[SkippedFile] = []

    def record_unreadable(error: OSError) -> None:
        relpath = Path(error.filename).relative_to(root).as_posix()
        unreadable.append(SkippedFile(relpath, f"unreadable: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=record_unreadable):
        dirnames[:] = [name for name in dirnames if not _is_ignored_name(name)]
        relative_dir = Path(dirpath).relative_to(root)
        found.extend((relative_dir / name).as_posix() for name in filenames)
    return found, unreadable


def _is_ignored_name(name: str) -> bool:
    """Hidden files and dirs and dependency/cache folders are never part of a corpus."""
    return name.startswith(".") or name in IGNORED_DIRS


def is_selected(relpath: str, include: list[str], exclude: list[str], include_code: bool = False) -> bool:
    """Say whether a file belongs to the corpus: not hidden, not excluded, and included."""
    if any(_is_ignored_name(part) for part in PurePosixPath(relpath).parts):
        return False
    if any(matches_glob(relpath, pattern) for pattern in exclude):
        return False
    if include:
        return any(matches_glob(relpath, pattern) for pattern in include)
    suffix = PurePosixPath(relpath).suffix.lower()
    return suffix in DOC_FORMATS or (include_code and suffix in CODE_LANGUAGES)


def _names_extension(relpath: str, include: list[str]) -> bool:
    """True when an include glob that ends in this file's extension (like '*.py') selects it."""
    suffix = PurePosixPath(relpath).suffix.lower()
    return bool(suffix) and any(
        pattern.lower().endswith(suffix) and matches_glob(relpath, pattern) for pattern in include
    )


def matches_glob(relpath: str, pattern: str) -> bool:
    """Match a glob against a POSIX path, one of its parent dirs, or (no '/' in the glob) any one name."""
    pattern = pattern.removeprefix("./").strip("/")
    regex = _glob_regex(pattern)
    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    if "/" not in pattern:
        candidates.extend(parts)
    return any(regex.fullmatch(candidate) for candidate in candidates)


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob: '*' and '?' stay inside one path segment, '**' spans any number of them."""
    return re.compile("".join(_glob_token_regex(token) for token in _GLOB_TOKEN.findall(pattern)))


def _glob_token_regex(token: str) -> str:
    """Translate one glob token ('**/', '*', '[!a-z]', a literal character) to a regex."""
    if token in _GLOB_WILDCARDS:
        return _GLOB_WILDCARDS[token]
    if len(token) > 2 and token.startswith("["):
        body = token[1:-1].replace("\\", "\\\\")
        return "[" + ("^" + body[1:] if body[0] == "!" else "\\" + body if body[0] == "^" else body) + "]"
    return re.escape(token)


def read_source_file(
    root: Path, relpath: str, url_for: Callable[[str], str] | None, include_code: bool
) -> SourceItem:
    """Read and convert one file, or say why it was skipped."""
    path = root / relpath
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return SkippedFile(relpath, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            return SkippedFile(relpath, "larger than 5 MB")
        raw = path.read_bytes()
    except OSError as exc:
        return SkippedFile(relpath, f"unreadable: {exc.strerror or exc}")
    converted = to_text(relpath, raw, include_code)
    if isinstance(converted, str):
        return SkippedFile(relpath, converted)
    text, fmt = converted
    source_url = url_for(relpath) if url_for else path.resolve().as_uri()
    return SourceDocument(path=relpath, source_url=source_url, text=text, format=fmt)
