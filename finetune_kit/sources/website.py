"""Crawl one website, from its sitemap.xml or a start page, into Markdown documents.

Same site only (scheme and host), robots.txt obeyed, a bounded number of requests in flight. A page whose
sitemap `lastmod` is unchanged is not requested again; any other known page is asked for with
If-None-Match / If-Modified-Since, and a 304 gives back the text already stored.
"""

import gzip
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree
import httpx2
from bs4 import BeautifulSoup, Tag, UnicodeDammit
from defusedxml import DefusedXmlException

from finetune_kit import __version__
from finetune_kit.config import Settings
from finetune_kit.errors import NestingTooDeep, SourceError
from finetune_kit.sources import (
    ReadContext,
    SkippedFile,
    SourceDocument,
    SourceIdentity,
    SourceItem,
    SourceIter,
    url_or_path_key,
)
from finetune_kit.sources.text import html_to_markdown
from finetune_kit.store import Store, utc_now

log = logging.getLogger(__name__)

USER_AGENT = f"ftkit/{__version__} (docs ingest; +robots.txt obeyed)"
ROBOTS_AGENT = "ftkit"
MAX_PAGE_BYTES = 5 * 1024 * 1024
MAX_SITEMAP_BYTES = 50 * 1024 * 1024  # the sitemaps.org limit, uncompressed
MAX_SITEMAPS = 100  # sitemaps read through a sitemap index
MAX_REDIRECTS = 5
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
ASSET_SUFFIXES = frozenset({
    ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".ico", ".css", ".js", ".mjs", ".map", ".pdf", ".zip",
    ".gz", ".tgz", ".tar", ".mp3", ".mp4", ".webm", ".woff", ".woff2", ".ttf", ".eot", ".xml", ".json", ".rss",
})  # fmt: skip


@dataclass(frozen=True)
class CrawlOptions:
    """How hard ftkit may press one site."""

    concurrency: int = 4
    max_pages: int = 500
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Page:
    """One page as Markdown, with the links it holds and what tells a later crawl whether it changed."""

    url: str
    text: str
    links: tuple[str, ...]
    etag: str | None = None
    last_modified: str | None = None
    lastmod: str | None = None  # from the sitemap
    fetched: bool = True  # False: unchanged, its stored text reused


class _PageSkipped(Exception):
    """A page cannot be used; the message is the reason recorded for it."""


class _PageUnavailable(_PageSkipped):
    """The site failed to serve a page for now (timeout, 5xx, 429): `known`, the stored copy of the URL that
    failed (a redirect's target, maybe), stays in use."""

    def __init__(self, reason: str, known: "Page | None") -> None:
        super().__init__(reason)
        self.known = known


def iter_website(spec: str, settings: Settings, store: Store, source_id: str) -> SourceIter:
    """Crawl the site at `spec` (a sitemap URL or a start page) and yield its pages as documents."""
    options = CrawlOptions(settings.crawl.concurrency, settings.crawl.max_pages, settings.crawl.timeout_s)
    memory = PageMemory(store, source_id)
    with Crawler(spec, options, memory.load()) as crawler:
        results = crawler.crawl()
    pages = [result for result in results if isinstance(result, Page)]
    memory.save(pages)
    log.info("%s: %d pages, %d unchanged", spec, len(pages), sum(not page.fetched for page in pages))
    items: list[SourceItem] = [
        SourceDocument(path=page_path(page.url), source_url=page.url, text=page.text, format="html")
        if isinstance(page, Page)
        else page
        for page in results
    ]
    return iter(items)


def page_path(url: str) -> str:
    """A page's path within its site, as documents are keyed: '/guide/install.html?v=2'."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def normalize_url(url: str) -> str:
    """Drop the fragment, lower-case scheme and host, and give an empty path a '/'."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class PageMemory:
    """What the last crawl of one source learnt per page (validators, lastmod, links), in web_pages."""

    def __init__(self, store: Store, source_id: str) -> None:
        self.store = store
        self.source_id = source_id

    def load(self) -> dict[str, Page]:
        """Known pages whose stored text is still the active document, by URL; others must be fetched."""
        rows = self.store.db.execute(
            "SELECT w.url, w.etag, w.last_modified, w.lastmod, w.links_json, w.text_sha256, d.text"
            " FROM web_pages w JOIN documents d ON d.source_id = w.source_id AND d.path = w.path"
            " AND d.status = 'active' WHERE w.source_id = ?",
            (self.source_id,),
        )
        return {
            row["url"]: Page(
                row["url"],
                row["text"],
                tuple(json.loads(row["links_json"])),
                row["etag"],
                row["last_modified"],
                row["lastmod"],
                fetched=False,
            )
            for row in rows
            if _sha256(row["text"]) == row["text_sha256"]  # the validators belong to the text we hold
        }

    def save(self, pages: list[Page]) -> None:
        """Replace this source's rows with what this crawl saw, in one transaction."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM web_pages WHERE source_id = ?", (self.source_id,))
            db.executemany(
                "INSERT OR REPLACE INTO web_pages(source_id, url, path, etag, last_modified, lastmod,"
                " text_sha256, links_json, fetched_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        self.source_id,
                        page.url,
                        page_path(page.url),
                        page.etag,
                        page.last_modified,
                        page.lastmod,
                        _sha256(page.text),
                        json.dumps(list(page.links)),
                        utc_now(),
                    )
                    for page in pages
                ],
            )


class Crawler:
    """Fetches the pages of one site with a shared HTTP client and a bounded pool of workers."""

    def __init__(self, spec: str, options: CrawlOptions, known: dict[str, Page]) -> None:
        parts = urlsplit(spec)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise SourceError(f"{spec}: not a website URL — pass https://host/ or https://host/sitemap.xml")
        self.spec = spec
        self.start = normalize_url(spec)
        self.origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        self.options = options
        self.known = known
        self.client = httpx2.Client(
            headers={"User-Agent": USER_AGENT},
            timeout=options.timeout_s,
            limits=httpx2.Limits(max_connections=options.concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="ftkit-crawl")
        self.robots = RobotFileParser()

    def __enter__(self) -> "Crawler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.client.close()

    def crawl(self) -> list[Page | SkippedFile]:
        """Read robots.txt, then the sitemap's pages or the pages reachable from the start page."""
        self.robots = self._load_robots()
        if _looks_like_sitemap(self.start):
            return self._crawl_sitemap()
        return self._crawl_links()

    def is_same_site(self, url: str) -> bool:
        """True for URLs with this site's scheme and host (and port)."""
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}" == self.origin

    def _load_robots(self) -> RobotFileParser:
        """Fetch and parse robots.txt: 401/403 forbid everything, other 4xx allow everything (as urllib does)."""
        robots_url = self.origin + "/robots.txt"
        parser = RobotFileParser(robots_url)
        try:
            response = self.client.get(robots_url, follow_redirects=True)
        except httpx2.HTTPError as exc:
            raise SourceError(
                f"{self.origin}: unreachable ({_describe(exc)}) — check the URL and your network"
            ) from exc
        if response.status_code >= 500:
            raise SourceError(
                f"{robots_url}: HTTP {response.status_code} — the site is failing; try again later"
            )
        if response.status_code in (401, 403):
            parser.parse(["User-agent: *", "Disallow: /"])
        elif response.status_code >= 400:
            parser.parse([])  # no robots.txt: everything is allowed
        else:
            parser.parse(response.text.splitlines())
        return parser

    def _crawl_links(self) -> list[Page | SkippedFile]:
        """Breadth-first from the start page, one level at a time, until max_pages pages are read."""
        results: list[Page | SkippedFile] = []
        seen, read, frontier = {self.start}, set[str](), [self.start]
        while frontier and len(read) < self.options.max_pages:
            room = self.options.max_pages - len(read)
            batch, frontier = frontier[:room], frontier[room:]
            for result in self._fetch_all((url, None) for url in batch):
                if isinstance(result, SkippedFile) and not results:
                    raise SourceError(
                        f"{self.spec}: {result.reason} — pass the site's start page or its sitemap.xml"
                    )
                if isinstance(result, Page):
                    if result.url in read:
                        continue  # a redirect to a page already read
                    read.add(result.url)
                    new = [link for link in result.links if link not in seen and link != result.url]
                    seen.update(new, {result.url})
                    frontier += new
                results.append(result)
        return results + [SkippedFile(page_path(url), self._over_limit()) for url in frontier]

    def _crawl_sitemap(self) -> list[Page | SkippedFile]:
        """Every same-site page the sitemap (or sitemap index) lists, up to max_pages."""
        entries, skipped = self._read_sitemap(self.start, top=True)
        wanted, over = entries[: self.options.max_pages], entries[self.options.max_pages :]
        results: list[Page | SkippedFile] = list(skipped)
        read: set[str] = set()
        for result in self._fetch_all(wanted):
            if isinstance(result, Page):
                if result.url in read:
                    continue  # two sitemap URLs redirecting to one page
                read.add(result.url)
            results.append(result)
        return results + [SkippedFile(page_path(url), self._over_limit()) for url, _ in over]

    def _over_limit(self) -> str:
        return f"over the crawl_max_pages limit ({self.options.max_pages})"

    def _fetch_all(self, wanted: Iterable[tuple[str, str | None]]) -> list[Page | SkippedFile]:
        """Fetch (url, lastmod) pairs on the worker pool; results keep the input order."""
        return list(self.pool.map(lambda pair: self.fetch_page(*pair), wanted))

    def fetch_page(self, url: str, lastmod: str | None) -> Page | SkippedFile:
        """One page as Markdown, its stored version when unchanged, or why it was skipped."""
        known = self.known.get(url)
        if known is not None and lastmod is not None and known.lastmod == lastmod:
            return known  # the sitemap says it has not changed: no request at all
        try:
            if not self.robots.can_fetch(ROBOTS_AGENT, url):
                raise _PageSkipped("disallowed by robots.txt")
            response, known = self._open(url, known)
            try:
                return self._read_page(response, known, lastmod)
            except httpx2.HTTPError as exc:  # the body broke off
                raise _PageUnavailable(self._failure(exc), known) from exc
            finally:
                response.close()
        except _PageUnavailable as exc:
            return self._stored_or_skipped(url, exc.known, str(exc))
        except _PageSkipped as exc:
            return SkippedFile(page_path(url), str(exc))

    def _failure(self, exc: httpx2.HTTPError) -> str:
        if isinstance(exc, httpx2.TimeoutException):
            return f"timed out after {self.options.timeout_s:g}s (crawl_timeout_s)"
        return f"unreachable ({_describe(exc)})"

    def _stored_or_skipped(self, url: str, known: Page | None, reason: str) -> Page | SkippedFile:
        """A page the site failed to serve this time keeps its stored text: an outage retires nothing."""
        if known is None:
            return SkippedFile(page_path(url), reason)
        log.warning("%s: %s — keeping the copy from the last crawl", url, reason)
        return known

    def _open(self, url: str, known: Page | None) -> tuple[httpx2.Response, Page | None]:
        """GET url as a stream, following redirects only within the site: (response, the stored copy of the
        page it ended on, whose validators were sent). The caller closes the response."""
        for _ in range(MAX_REDIRECTS + 1):
            request = self.client.build_request("GET", url, headers=_validators(known))
            try:
                response = self.client.send(request, stream=True)
            except httpx2.HTTPError as exc:
                raise _PageUnavailable(self._failure(exc), known) from exc
            if not response.has_redirect_location:
                return response, known
            response.close()
            target = normalize_url(urljoin(url, response.headers["location"]))
            if url == self.start and not self.is_same_site(target) and _same_host(url, target):
                self._move_to(target)  # http:// to https://, or example.com to www.example.com
            if not self.is_same_site(target):
                raise _PageSkipped(f"redirects to another site ({target})")
            if not self.robots.can_fetch(ROBOTS_AGENT, target):
                raise _PageSkipped("redirects to a page robots.txt disallows")
            url, known = target, self.known.get(target)
        raise _PageSkipped(f"more than {MAX_REDIRECTS} redirects")

    def _move_to(self, start: str) -> None:
        """The start URL lives elsewhere: crawl that site instead, under its own robots.txt."""
        parts = urlsplit(start)
        log.info("%s redirects to %s: crawling %s://%s", self.start, start, parts.scheme, parts.netloc)
        self.start, self.origin = start, f"{parts.scheme}://{parts.netloc}"
        self.robots = self._load_robots()

    def _read_page(self, response: httpx2.Response, known: Page | None, lastmod: str | None) -> Page:
        """Turn a response into a Page: 304 reuses the stored text; HTML is converted to Markdown."""
        url = normalize_url(str(response.url))
        if response.status_code == 304 and known is not None:
            etag = response.headers.get("etag") or known.etag
            modified = response.headers.get("last-modified") or known.last_modified
            return Page(url, known.text, known.links, etag, modified, lastmod, fetched=False)
        if response.status_code == 429 or response.status_code >= 500:
            raise _PageUnavailable(f"HTTP {response.status_code}", known)
        if response.status_code != 200:
            raise _PageSkipped(f"HTTP {response.status_code}")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in HTML_TYPES:
            raise _PageSkipped(f"not HTML ({content_type or 'no content type'})")
        raw = _read_limited(response, MAX_PAGE_BYTES, "larger than 5 MB")
        text, links = self.convert_html(url, raw, response.charset_encoding)
        etag, modified = response.headers.get("etag"), response.headers.get("last-modified")
        return Page(url, text, links, etag, modified, lastmod)

    def convert_html(self, url: str, raw: bytes, charset: str | None) -> tuple[str, tuple[str, ...]]:
        """Markdown (titled by <title> when the body has no top heading) and the same-site links to follow."""
        markup = _decode_html(raw, charset)
        soup = BeautifulSoup(markup, "html.parser")
        base_tag = soup.find("base", href=True)
        base = urljoin(url, str(base_tag["href"])) if isinstance(base_tag, Tag) else url
        links = dict.fromkeys(
            link
            for anchor in soup.find_all("a", href=True)
            if self._is_followable(link := normalize_url(urljoin(base, str(anchor["href"]))))
        )
        text = "\n".join(line.rstrip() for line in _page_markdown(markup).split("\n")).strip("\n")
        title = soup.title.get_text(" ", strip=True) if soup.title else ""
        if title and not re.search(r"^# ", text, re.M):
            text = f"# {title}\n\n{text}"
        if not text.strip():
            raise _PageSkipped("empty after conversion")
        return text, tuple(links)

    def _is_followable(self, url: str) -> bool:
        """Same-site http(s) links that are not images, stylesheets, archives and other assets."""
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
        return self.is_same_site(url) and suffix not in ASSET_SUFFIXES

    def _read_sitemap(
        self, url: str, top: bool, depth: int = 0
    ) -> tuple[list[tuple[str, str | None]], list[SkippedFile]]:
        """(url, lastmod) of every same-site page a sitemap lists, following a sitemap index two deep."""
        try:
            root = _parse_sitemap(url, self._download_sitemap(url))
        except SourceError as exc:
            if top:
                raise
            return [], [SkippedFile(url, str(exc).removeprefix(url + ": "))]
        listed = _sitemap_entries(root)
        is_index = _local_name(root.tag) == "sitemapindex"
        entries = [(loc, lastmod) for loc, lastmod in listed if self.is_same_site(loc)]
        skipped = [
            SkippedFile(loc, f"not on {self.origin}") for loc, _ in listed if not self.is_same_site(loc)
        ]
        if not is_index:
            return list(dict(entries).items()), skipped
        pages: list[tuple[str, str | None]] = []
        for child, _ in entries[:MAX_SITEMAPS] if depth < 2 else []:
            child_pages, child_skipped = self._read_sitemap(child, top=False, depth=depth + 1)
            pages += child_pages
            skipped += child_skipped
        return list(dict(pages).items()), skipped

    def _download_sitemap(self, url: str) -> bytes:
        """A sitemap's bytes, gunzipped when it is a .xml.gz; SourceError when it cannot be had."""
        if not self.robots.can_fetch(ROBOTS_AGENT, url):
            raise SourceError(f"{url}: disallowed by robots.txt — ask the site's owner, or pass a start page")
        try:
            response, _ = self._open(url, None)
            try:
                if response.status_code != 200:
                    raise SourceError(f"{url}: HTTP {response.status_code} — check the sitemap URL")
                raw = _read_limited(response, MAX_SITEMAP_BYTES, "sitemap larger than 50 MB")
            finally:
                response.close()
        except (_PageSkipped, httpx2.HTTPError) as exc:
            raise SourceError(f"{url}: {_describe(exc)} — check the sitemap URL and your network") from exc
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(MAX_SITEMAP_BYTES + 1)
            except (OSError, EOFError) as exc:
                raise SourceError(f"{url}: a broken .gz file ({exc}) — check the sitemap URL") from exc
            if len(raw) > MAX_SITEMAP_BYTES:
                raise SourceError(f"{url}: unpacks to more than 50 MB — split it with a sitemap index")
        return raw


def _page_markdown(markup: str) -> str:
    """A page as Markdown; a page nested too deeply to convert is skipped with its reason, not the crawl."""
    try:
        return html_to_markdown(markup)
    except NestingTooDeep as exc:
        raise _PageSkipped(str(exc)) from exc
    except RecursionError as exc:
        raise _PageSkipped("nested too deeply to convert") from exc


def _same_host(url: str, target: str) -> bool:
    """The same host but for the scheme, the port or a leading `www.`: a site that moved, not another site."""
    if urlsplit(target).scheme.lower() not in ("http", "https"):
        return False  # file:, ftp:, data: … are never a site that moved
    hosts = [(urlsplit(u).hostname or "").removeprefix("www.") for u in (url, target)]
    return hosts[0] == hosts[1] != ""


def _looks_like_sitemap(url: str) -> bool:
    """Sitemaps are named *.xml or *.xml.gz; anything else is a start page."""
    path = urlsplit(url).path.lower()
    return path.endswith((".xml", ".xml.gz"))


def _validators(known: Page | None) -> dict[str, str]:
    """Conditional-GET headers for a page whose text is stored."""
    headers = {}
    if known is not None and known.etag:
        headers["If-None-Match"] = known.etag
    if known is not None and known.last_modified:
        headers["If-Modified-Since"] = known.last_modified
    return headers


def _read_limited(response: httpx2.Response, limit: int, too_big: str) -> bytes:
    """The (decompressed) body, refusing to hold more than `limit` bytes."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise _PageSkipped(too_big)
    return bytes(body)


def _decode_html(raw: bytes, charset: str | None) -> str:
    """Decode with the charset the server declared, else let bs4 sniff <meta charset> and the bytes."""
    if charset:
        try:
            return raw.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong header: fall back to sniffing, as browsers do
    return UnicodeDammit(raw, is_html=True).unicode_markup or raw.decode("utf-8", "replace")


def _parse_sitemap(url: str, raw: bytes) -> Element:
    """Parse untrusted XML safely (no entities, no external references) and check it is a sitemap."""
    try:
        root = defusedxml.ElementTree.fromstring(raw)
    except ParseError as exc:
        line, column = exc.position
        raise SourceError(
            f"{url}: not an XML sitemap (line {line}, column {column}) — pass a sitemap.xml URL or the"
            " site's start page"
        ) from exc
    except DefusedXmlException as exc:
        raise SourceError(f"{url}: unsafe XML refused ({exc}) — pass the site's start page instead") from exc
    if _local_name(root.tag) not in ("urlset", "sitemapindex"):
        raise SourceError(
            f"{url}: not a sitemap (the root element is <{_local_name(root.tag)}>) — pass a sitemap.xml URL"
            " or the site's start page"
        )
    return root


def _sitemap_entries(root: Element) -> list[tuple[str, str | None]]:
    """(loc, lastmod) of each <url> or <sitemap> element, namespaced or not."""
    entries = []
    for element in root:
        fields = {_local_name(child.tag): (child.text or "").strip() for child in element}
        if fields.get("loc"):
            entries.append((normalize_url(fields["loc"]), fields.get("lastmod") or None))
    return entries


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _describe(exc: Exception) -> str:
    """A short, one-line description of an HTTP failure."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class WebsiteSource:
    """An http(s) URL that no git host claims: a sitemap, or a start page to crawl."""

    name = "website"

    def claims(self, spec: str) -> bool:
        """Say whether `spec` is an http(s) URL."""
        return spec.lower().startswith(("http://", "https://"))

    def identity(self, spec: str) -> SourceIdentity:
        """The URL as given."""
        return SourceIdentity("website", url_or_path_key(spec))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """The site's pages; what was fetched before is remembered under the source's id."""
        return list(iter_website(spec, context.settings, context.store, context.source_id))
