"""Read a directory (or one file) of docs: glob selection, size and readability checks, conversion."""

import itertools
import os
import re
import stat
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path, PurePosixPath

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
from finetune_kit.sources.text import CODE_LANGUAGES, DOC_FORMATS, to_text

DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024  # the `max_file_bytes` setting's default
OUTSIDE_SOURCE = (
    "a symbolic link to outside the source — not read (copy the file in, or add its folder as a source)"
)
_GLOB_TOKEN = re.compile(r"\*\*/|\*\*|\*|\?|\[!?\]?[^\]]*\]|.", re.S)
_GLOB_WILDCARDS = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
IGNORED_DIRS = frozenset({"node_modules", "__pycache__"})  # hidden names (".git", ".venv") are skipped too


def iter_directory(
    root: Path,
    include: list[str],
    exclude: list[str],
    url_for: Callable[[str], str] | None = None,
    include_code: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> SourceIter:
    """Yield every selected file under root (or root itself when it is a file), in sorted path order."""
    if not root.exists():
        raise SourceError(f"{root}: no such file or directory — check the path")
    root = root.resolve()  # the folder (or file) named is the source, wherever a link to it points
    if root.is_file():
        # a file named on the command line is wanted whatever its type, code included
        return iter([read_source_file(root.parent, root.name, url_for, True, max_file_bytes)])
    relpaths, skipped_dirs = _walk(root, exclude)
    files = iter_files(root, relpaths, include, exclude, url_for, include_code, max_file_bytes)
    return itertools.chain(files, skipped_dirs)


def iter_files(
    root: Path,
    relpaths: Iterable[str],
    include: list[str],
    exclude: list[str],
    url_for: Callable[[str], str] | None = None,
    include_code: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> SourceIter:
    """Yield the selected files among relpaths (POSIX, relative to root), read and converted, sorted."""
    for relpath in sorted(relpaths):
        if is_selected(relpath, include, exclude, include_code):
            code_wanted = include_code or _names_extension(relpath, include)
            yield read_source_file(root, relpath, url_for, code_wanted, max_file_bytes)


def _walk(root: Path, exclude: list[str]) -> tuple[list[str], list[SkippedFile]]:
    """List files under root as POSIX paths, pruning hidden and ignored dirs; report unreadable and linked dirs."""
    found: list[str] = []
    skipped: list[SkippedFile] = []

    def record_unreadable(error: OSError) -> None:
        relpath = Path(error.filename).relative_to(root).as_posix()
        skipped.append(SkippedFile(relpath, f"unreadable: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=record_unreadable):
        relative_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [name for name in dirnames if not _is_ignored_name(name)]
        for name in [name for name in dirnames if (Path(dirpath) / name).is_symlink()]:
            dirnames.remove(
                name
            )  # os.walk does not descend into links; say so rather than drop them silently
            relpath = (relative_dir / name).as_posix()
            if not any(matches_glob(relpath, pattern) for pattern in exclude):
                skipped.append(SkippedFile(relpath, _linked_dir_reason(root, root / relpath)))
        found.extend((relative_dir / name).as_posix() for name in filenames)
    return found, skipped


def _linked_dir_reason(root: Path, link: Path) -> str:
    """Why a symbolic link to a directory is not read."""
    return _outside_reason(link, root) or (
        "a symbolic link to a folder of this source — not followed (its files are read where they lie)"
    )


def _outside_reason(path: Path, root: Path) -> str | None:
    """Why `path` may not be read when, through any chain of links, it leaves `root` (resolved); else None."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python 3.11 and 3.12)
        return "unreadable: a loop of symbolic links"
    return None if resolved.is_relative_to(root) else OUTSIDE_SOURCE


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


def _size(n_bytes: int) -> str:
    """A byte count as a person writes it: 5 MB, 512 KB, 1,000 bytes."""
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if n_bytes % scale == 0:
            return f"{n_bytes // scale} {unit}"
    return f"{n_bytes:,} bytes"


def read_source_file(
    root: Path,
    relpath: str,
    url_for: Callable[[str], str] | None,
    include_code: bool,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> SourceItem:
    """Read and convert one file, or say why it was skipped; nothing that resolves outside root is read."""
    path = root / relpath
    if (outside := _outside_reason(path, root.resolve())) is not None:
        return SkippedFile(relpath, outside)
    try:
        path = path.resolve()  # read what was checked, not a name a link could be swapped behind
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return SkippedFile(relpath, "not a regular file")
        if info.st_size > max_file_bytes:
            return SkippedFile(
                relpath, f"larger than {_size(max_file_bytes)} (raise max_file_bytes to read it)"
            )
        raw = path.read_bytes()
    except OSError as exc:
        return SkippedFile(relpath, f"unreadable: {exc.strerror or exc}")
    converted = to_text(relpath, raw, include_code)
    if isinstance(converted, str):
        return SkippedFile(relpath, converted)
    text, fmt = converted
    source_url = url_for(relpath) if url_for else path.resolve().as_uri()
    return SourceDocument(path=relpath, source_url=source_url, text=text, format=fmt)


class LocalPathSource:
    """A folder or a file on disk: what any spec no other kind claims is taken to be."""

    name = "local"

    def claims(self, spec: str) -> bool:
        """Every spec: this kind is asked last."""
        return True

    def identity(self, spec: str) -> SourceIdentity:
        """`directory` or `file`, and the absolute path."""
        kind = "directory" if Path(spec).expanduser().is_dir() else "file"
        return SourceIdentity(kind, path_key(spec))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """Every selected file under the folder, or the file itself."""
        settings = context.settings
        items = iter_directory(
            Path(spec).expanduser(),
            settings.include,
            settings.exclude,
            include_code=settings.include_code,
            max_file_bytes=settings.max_file_bytes,
        )
        return list(items)
