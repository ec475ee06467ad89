"""Read the tracked files of a git repository (local, or cloned into a cache) with commit permalinks."""

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from finetune_kit.errors import SourceError
from finetune_kit.sources import ReadContext, SourceIdentity, SourceItem, SourceIter, url_or_path_key
from finetune_kit.sources.files import DEFAULT_MAX_FILE_BYTES, iter_files

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:owner/repo.git
_HOSTED = re.compile(r"^https?://(?:[^/@]+@)?(?:www\.)?(?:github\.com|gitlab\.com|bitbucket\.org)/", re.I)
_REMOTE = re.compile(
    r"^(?:[a-z+]+://)?(?:[^@/]+@)?(?P<host>[^/:@]+)(?::\d+)?[:/](?P<path>.+?)(?:\.git)?/*$", re.I
)
_PERMALINKS = {
    "github.com": "https://github.com/{repo}/blob/{commit}/",
    "gitlab.com": "https://gitlab.com/{repo}/-/blob/{commit}/",
    "bitbucket.org": "https://bitbucket.org/{repo}/src/{commit}/",
}


def is_git_spec(spec: str) -> bool:
    """Say whether a corpus argument names a git repository rather than a plain directory or file."""
    if spec.startswith(("ssh://", "git://")) or _SCP_LIKE.match(spec) or _HOSTED.match(spec):
        return True
    if spec.startswith("file://"):
        return _is_repository(Path(unquote(urlparse(spec).path)))
    if "://" in spec:
        return spec.rstrip("/").endswith(".git")
    return (Path(spec) / ".git").exists()


def _is_repository(path: Path) -> bool:
    """True for a work tree (has .git) or a bare repository (has HEAD and objects/)."""
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())


def iter_git(
    spec: str,
    include: list[str],
    exclude: list[str],
    cache_dir: Path,
    include_code: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> SourceIter:
    """Yield the selected tracked files of a repository, each with a permalink at the HEAD commit."""
    if _is_url(spec):
        checkout = _clone_or_update(spec, cache_dir)
        remote: str | None = spec
    else:
        checkout = Path(spec)
        if not (checkout / ".git").exists():
            raise SourceError(
                f"{spec}: not a git repository — pass a repository URL or a directory with .git"
            )
        remote = _origin_url(checkout)
    commit = _head_commit(checkout, _redact(spec))
    listing = _git_output(
        ["ls-files", "-z"],
        checkout,
        f"{_redact(spec)}: cannot list tracked files",
        "run git status there to see why",
    )
    url_for = _permalink_builder(remote, commit) or _file_url_builder(checkout, commit)
    relpaths = listing.split("\0")[
        :-1
    ]  # a committed symlink is listed too: iter_files reads none leading outside
    return iter_files(checkout, relpaths, include, exclude, url_for, include_code, max_file_bytes)


def _is_url(spec: str) -> bool:
    """True when the spec is something to clone rather than a local path."""
    return "://" in spec or bool(_SCP_LIKE.match(spec))


def _clone_or_update(url: str, cache_dir: Path) -> Path:
    """Shallow-clone url into the cache, or bring an earlier clone up to date with the remote HEAD."""
    checkout = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (checkout / ".git").is_dir():
        failure, hint = (
            f"could not update {_redact(url)}",
            f"check your network, or delete {checkout} to clone again",
        )
        _git_output(["fetch", "--quiet", "--depth", "1", "origin", "HEAD"], checkout, failure, hint)
        _git_output(["reset", "--quiet", "--hard", "FETCH_HEAD"], checkout, failure, hint)
        return checkout
    # clone to a temporary name and rename, so an interrupted clone is never mistaken for a finished one
    partial = checkout.with_name(checkout.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    failure, hint = f"could not clone {_redact(url)}", "check the URL and that you can access it"
    _git_output(["clone", "--quiet", "--depth", "1", url, str(partial)], None, failure, hint)
    shutil.rmtree(checkout, ignore_errors=True)
    os.replace(partial, checkout)
    return checkout


def _head_commit(checkout: Path, label: str) -> str:
    """The full sha of HEAD; a repository without commits cannot give permalinks."""
    failure = f"{label}: cannot read the HEAD commit"
    return _git_output(["rev-parse", "HEAD"], checkout, failure, "commit at least once").strip()


def _origin_url(checkout: Path) -> str | None:
    """The URL of the `origin` remote, or None when there is none."""
    result = _run_git(["remote", "get-url", "origin"], checkout)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _git_output(args: list[str], cwd: Path | None, failure: str, hint: str) -> str:
    """Run git and return stdout; on failure raise SourceError: failure, git's last stderr line, hint."""
    result = _run_git(args, cwd)
    if result.returncode != 0:
        detail = _redact(_git_error_line(result.stderr)) or f"git exited with status {result.returncode}"
        raise SourceError(f"{failure}: {detail} — {hint}")
    return result.stdout


def _git_error_line(stderr: str) -> str:
    """The line of git's stderr that says what went wrong: the first 'fatal:'/'error:' line, else the last."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (errors or lines or [""])[0 if errors else -1]


def _run_git(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess[str]:
    """Run one git command without ever waiting for a password prompt."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise SourceError("git is not installed — install git, or pass a plain directory") from exc


def _redact(text: str) -> str:
    """Remove credentials (https://user:token@host) from a URL or a git message."""
    return re.sub(r"(://)[^/@\s]+@", r"\1", text)


def parse_remote(remote: str) -> tuple[str, str] | None:
    """Split a remote URL (https, ssh:// or git@host:owner/repo.git) into (host, 'owner/repo')."""
    match = _REMOTE.match(remote.strip())
    if not match:
        return None
    host = match.group("host").lower().removeprefix("www.")
    return host, match.group("path").strip("/")


def _permalink_builder(remote: str | None, commit: str) -> Callable[[str], str] | None:
    """Build `path -> permalink` for GitHub, GitLab and Bitbucket remotes; None for other hosts."""
    parsed = parse_remote(remote) if remote else None
    if parsed is None or parsed[0] not in _PERMALINKS:
        return None
    host, repo = parsed
    if host != "gitlab.com":  # only GitLab has nested namespaces (group/subgroup/repo)
        repo = "/".join(repo.split("/")[:2])
    base = _PERMALINKS[host].format(repo=repo, commit=commit)
    return lambda relpath: base + quote(relpath)


def _file_url_builder(checkout: Path, commit: str) -> Callable[[str], str]:
    """Build `path -> file:// URI#commit=sha` for repositories on hosts without known permalinks."""
    root = checkout.resolve()
    return lambda relpath: f"{(root / relpath).as_uri()}#commit={commit}"


class GitSource:
    """A git repository: a clone URL, or a work tree or bare repository on disk."""

    name = "git"

    def claims(self, spec: str) -> bool:
        """Say whether `spec` names a git repository."""
        return is_git_spec(spec)

    def identity(self, spec: str) -> SourceIdentity:
        """The URL as given, or the repository's absolute path."""
        return SourceIdentity("git", url_or_path_key(spec))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """The selected tracked files at HEAD, a remote one cloned into the workspace's cache first."""
        settings = context.settings
        cache = settings.workspace / "cache" / "git"
        items = iter_git(
            spec, settings.include, settings.exclude, cache, settings.include_code, settings.max_file_bytes
        )
        return list(items)
