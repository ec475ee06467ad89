"""Website sources over real HTTP on 127.0.0.1: sitemaps, link crawls, robots.txt, conditional re-crawls."""

import gzip
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import SourceError
from finetune_kit.stages.ingest import IngestReport, ingest
from finetune_kit.store import Store
from tests.loopback import LoopbackServer

INSTALL = """<!doctype html><html><head><title>Install</title><script>track()</script>
<style>body{}</style></head><body>
<nav><a href="/">Home</a> <a href="/guide/config.html">Config</a></nav>
<main><h1>Install Quillstack</h1><p>Quillstack needs Python 3.11.</p>
<h2>With pip</h2><pre><code class="language-bash">pip install quillstack
</code></pre></main>
<footer>© Quillstack</footer></body></html>"""


def html(title: str, body: str, links: tuple[str, ...] | list[str] = ()) -> bytes:
    anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{body}</p><ul>{anchors}</ul></body></html>".encode()


class Site:
    """A static site: pages by path, ETag and Last-Modified validators, a request log."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[str, bytes, str]] = {}  # path -> (content type, body, last-modified)
        self.redirects: dict[str, str] = {}
        self.failures: dict[str, int] = {}  # path -> the error status it answers with
        self.delays: dict[str, float] = {}
        self.etags = True
        self.log: list[tuple[str, int]] = []  # (path, status) of every request
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.clock = 1_700_000_000
        self.url = ""

    def put(self, path: str, body: bytes | str, content_type: str = "text/html; charset=utf-8") -> None:
        self.clock += 60  # a changed page is newer
        raw = body.encode() if isinstance(body, str) else body
        self.pages[path] = (content_type, raw, formatdate(self.clock, usegmt=True))

    def requested(self, path: str) -> list[int]:
        return [status for logged, status in self.log if logged == path]


class Handler(BaseHTTPRequestHandler):
    server: "SiteServer"

    def do_GET(self) -> None:
        site = self.server.site
        with site.lock:
            site.in_flight += 1
            site.max_in_flight = max(site.max_in_flight, site.in_flight)
        try:
            time.sleep(site.delays.get(self.path, 0))
            status = self.respond(site)
        finally:
            with site.lock:
                site.in_flight -= 1
        site.log.append((self.path, status))

    def respond(self, site: Site) -> int:
        if self.path in site.redirects:
            return self.send(301, b"", {"Location": site.redirects[self.path]})
        if self.path in site.failures:
            return self.send(site.failures[self.path], b"down", {"Content-Type": "text/plain"})
        if self.path not in site.pages:
            return self.send(404, b"not found", {"Content-Type": "text/plain"})
        content_type, body, modified = site.pages[self.path]
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        headers = {"Content-Type": content_type, "Last-Modified": modified} | (
            {"ETag": etag} if site.etags else {}
        )
        since = self.headers.get("If-Modified-Since")
        if site.etags and self.headers.get("If-None-Match") == etag:
            return self.send(304, b"", headers)
        if since and parsedate_to_datetime(since) >= parsedate_to_datetime(modified):
            return self.send(304, b"", headers)
        return self.send(200, body, headers)

    def send(self, status: int, body: bytes, headers: dict[str, str]) -> int:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return status

    def log_message(self, format: str, *args: object) -> None:
        pass


class SiteServer(LoopbackServer):
    def __init__(self, site: Site) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.site = site


@pytest.fixture
def serve() -> Iterator[Callable[[Site], Site]]:
    servers: list[SiteServer] = []

    def start(site: Site) -> Site:
        server = SiteServer(site)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        site.url = f"http://127.0.0.1:{server.server_address[1]}"
        return site

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def site(serve: Callable[[Site], Site]) -> Site:
    site = serve(Site())
    site.put("/robots.txt", "User-agent: *\nDisallow: /private/\n", "text/plain")
    site.put("/", html("Home", "Welcome to Quillstack.", ["/guide/install.html", "/guide/config.html"]))
    site.put("/guide/install.html", INSTALL)
    site.put("/guide/config.html", html("Configure", "Set QUILL_HOME.", ["/private/keys.html", "/"]))
    site.put("/private/keys.html", html("Keys", "Secret."))
    return site


def crawl(settings: Settings, spec: str) -> tuple[IngestReport, dict[str, str]]:
    with Store(settings.db_path) as store:
        report = ingest(store, settings, [spec])
        documents = dict(
            store.db.execute("SELECT path, source_url FROM documents WHERE status = 'active' ORDER BY path")
        )
    return report, documents


def document_text(settings: Settings, path: str) -> str:
    with Store(settings.db_path) as store:
        return str(store.scalar("SELECT text FROM documents WHERE path = ? AND status = 'active'", (path,)))


def sitemap(urls: list[str], lastmods: dict[str, str] | None = None, index: bool = False) -> str:
    tag, item = ("sitemapindex", "sitemap") if index else ("urlset", "url")
    entries = "".join(
        f"<{item}><loc>{url}</loc>"
        + (f"<lastmod>{lastmods[url]}</lastmod>" if lastmods and url in lastmods else "")
        + f"</{item}>"
        for url in urls
    )
    return f'<?xml version="1.0" encoding="UTF-8"?><{tag} xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{entries}</{tag}>'


def test_a_start_url_crawls_same_site_links_as_markdown(site: Site, tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    report, documents = crawl(settings, site.url + "/")
    assert documents == {
        "/": site.url + "/",
        "/guide/config.html": site.url + "/guide/config.html",
        "/guide/install.html": site.url + "/guide/install.html",
    }
    assert document_text(settings, "/guide/install.html") == (
        "# Install Quillstack\n\nQuillstack needs Python 3.11.\n\n## With pip\n\n```bash\npip install quillstack\n```"
    )
    assert report.skipped == [("/private/keys.html", "disallowed by robots.txt")]
    assert site.requested("/private/keys.html") == []


def test_links_to_other_sites_are_not_followed(
    serve: Callable[[Site], Site], site: Site, tmp_path: Path
) -> None:
    other = serve(Site())
    other.put("/", html("Elsewhere", "Not ours."))
    site.put("/", html("Home", "Welcome.", [other.url + "/", "/guide/install.html", "https://example.com/x"]))
    _, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert sorted(documents) == [
        "/",
        "/guide/config.html",
        "/guide/install.html",
    ]  # config: from install's nav
    assert other.log == []


def test_recrawl_asks_with_validators_and_keeps_unchanged_pages(site: Site, tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    crawl(settings, site.url + "/")
    site.log.clear()
    second, documents = crawl(settings, site.url + "/")
    assert {path: site.requested(path) for path in documents} == {
        "/": [304],
        "/guide/config.html": [304],
        "/guide/install.html": [304],
    }
    assert (second.documents_unchanged, second.documents_new, second.documents_retired) == (3, 0, 0)
    assert (second.chunks_new, second.chunks_retired) == (0, 0)

    site.put("/guide/config.html", html("Configure", "Set QUILL_HOME and QUILL_PORT.", ["/"]))
    third, documents = crawl(settings, site.url + "/")
    assert site.requested("/guide/config.html")[-1] == 200
    assert (third.documents_unchanged, third.documents_new, third.documents_retired) == (2, 1, 1)
    assert len(documents) == 3


def test_last_modified_alone_is_enough_to_skip_unchanged_pages(site: Site, tmp_path: Path) -> None:
    site.etags = False
    settings = load_settings(workspace=tmp_path / "ws")
    crawl(settings, site.url + "/")
    site.log.clear()
    report, _ = crawl(settings, site.url + "/")
    assert site.requested("/guide/install.html") == [304]
    assert (report.documents_unchanged, report.chunks_new) == (3, 0)


def test_a_sitemap_lists_the_pages_and_an_unchanged_lastmod_skips_the_request(
    site: Site, tmp_path: Path
) -> None:
    urls = [
        site.url + "/guide/install.html",
        site.url + "/guide/config.html",
        "https://example.com/elsewhere",
    ]
    lastmods = {url: "2024-05-01" for url in urls}
    site.put("/sitemap.xml", sitemap(urls, lastmods), "application/xml")
    settings = load_settings(workspace=tmp_path / "ws")
    first, documents = crawl(settings, site.url + "/sitemap.xml")
    assert sorted(documents) == ["/guide/config.html", "/guide/install.html"]
    assert first.skipped == [("https://example.com/elsewhere", f"not on {site.url}")]

    site.log.clear()
    site.put("/sitemap.xml", sitemap(urls, lastmods | {urls[1]: "2024-06-01"}), "application/xml")
    second, _ = crawl(settings, site.url + "/sitemap.xml")
    assert [path for path, _ in site.log] == ["/robots.txt", "/sitemap.xml", "/guide/config.html"]
    assert site.requested("/guide/config.html") == [304]  # a new lastmod, but the page itself did not change
    assert (second.documents_unchanged, second.chunks_new) == (2, 0)


def test_a_sitemap_index_and_gzipped_sitemaps_are_followed(site: Site, tmp_path: Path) -> None:
    site.put("/sitemap-a.xml", sitemap([site.url + "/"]), "application/xml")
    site.put(
        "/sitemap-b.xml.gz",
        gzip.compress(sitemap([site.url + "/guide/install.html"]).encode()),
        "application/gzip",
    )
    index = sitemap(
        [site.url + "/sitemap-a.xml", site.url + "/sitemap-b.xml.gz", site.url + "/missing.xml"], index=True
    )
    site.put("/sitemap_index.xml", index, "application/xml")
    report, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/sitemap_index.xml")
    assert sorted(documents) == ["/", "/guide/install.html"]
    assert report.skipped == [
        (site.url + "/missing.xml", "HTTP 404 — check the sitemap URL"),
    ]


def test_redirects_within_the_site_are_followed_once(site: Site, tmp_path: Path) -> None:
    site.redirects["/old-install"] = "/guide/install.html"
    site.put("/", html("Home", "Welcome.", ["/old-install", "/guide/install.html"]))
    _, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert sorted(documents) == ["/", "/guide/config.html", "/guide/install.html"]
    assert site.requested("/old-install") == [301]  # one document, though both URLs were asked


def test_a_recrawl_through_a_redirect_reuses_the_stored_page(site: Site, tmp_path: Path) -> None:
    site.redirects["/docs"] = "/"
    settings = load_settings(workspace=tmp_path / "ws")
    crawl(settings, site.url + "/docs")
    site.log.clear()
    report, documents = crawl(settings, site.url + "/docs")
    assert (site.requested("/docs"), site.requested("/")) == ([301], [304])  # validators of where it lands
    assert sorted(documents) == ["/", "/guide/config.html", "/guide/install.html"]
    assert (report.documents_unchanged, report.documents_retired, report.chunks_new) == (3, 0, 0)


def test_a_start_url_that_moves_to_another_host_crawls_that_host(
    serve: Callable[[Site], Site], site: Site, tmp_path: Path
) -> None:
    entry = serve(Site())  # http://example.com/ -> https://www.example.com/, on loopback ports
    entry.redirects["/"] = site.url + "/"
    report, documents = crawl(load_settings(workspace=tmp_path / "ws"), entry.url + "/")
    assert documents == {path: site.url + path for path in ("/", "/guide/config.html", "/guide/install.html")}
    assert report.skipped == [("/private/keys.html", "disallowed by robots.txt")]  # the new host's robots.txt
    assert site.requested("/robots.txt") == [200]


def test_a_start_url_that_redirects_to_another_host_is_refused(
    serve: Callable[[Site], Site], site: Site, tmp_path: Path
) -> None:
    entry = serve(Site())  # a login page or a parked domain elsewhere is not this site
    entry.redirects["/"] = site.url.replace("127.0.0.1", "localhost") + "/"
    with pytest.raises(SourceError) as raised:
        crawl(load_settings(workspace=tmp_path / "ws"), entry.url + "/")
    assert str(raised.value).startswith(f"{entry.url}/: redirects to another site (http://localhost:")
    assert site.log == []


def test_a_timeout_on_a_recrawl_keeps_the_stored_copy_even_past_a_redirect(
    site: Site, tmp_path: Path
) -> None:
    site.redirects["/docs"] = "/"
    settings = load_settings(workspace=tmp_path / "ws", crawl_timeout_s=0.3)
    crawl(settings, site.url + "/docs")
    site.delays["/"] = 1.0  # the redirect answers, its target does not in time
    site.delays["/guide/install.html"] = 1.0
    report, documents = crawl(settings, site.url + "/docs")
    assert sorted(documents) == ["/", "/guide/config.html", "/guide/install.html"]
    assert (report.documents_unchanged, report.documents_retired) == (3, 0)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_page_the_site_fails_to_serve_keeps_its_stored_copy(
    site: Site, tmp_path: Path, status: int
) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    crawl(settings, site.url + "/")
    site.failures["/guide/install.html"] = status
    site.failures["/"] = status  # the start page too: its stored links carry the crawl on
    report, documents = crawl(settings, site.url + "/")
    assert sorted(documents) == ["/", "/guide/config.html", "/guide/install.html"]
    assert (report.documents_unchanged, report.documents_retired) == (3, 0)
    assert report.skipped == [("/private/keys.html", "disallowed by robots.txt")]

    site.failures.clear()
    site.log.clear()
    crawl(settings, site.url + "/")
    assert site.requested("/guide/install.html") == [304]  # its validators were kept through the outage


def test_a_new_page_the_site_fails_to_serve_is_skipped_with_the_status(site: Site, tmp_path: Path) -> None:
    site.failures["/guide/install.html"] = 503
    report, documents = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert "/guide/install.html" not in documents
    assert ("/guide/install.html", "HTTP 503") in report.skipped


def test_crawl_max_pages_bounds_the_crawl(site: Site, tmp_path: Path) -> None:
    report, documents = crawl(load_settings(workspace=tmp_path / "ws", crawl_max_pages=2), site.url + "/")
    assert sorted(documents) == ["/", "/guide/install.html"]
    assert report.skipped == [("/guide/config.html", "over the crawl_max_pages limit (2)")]


def test_crawl_concurrency_bounds_requests_in_flight(site: Site, tmp_path: Path) -> None:
    pages = [f"/p{n}.html" for n in range(8)]
    site.put("/", html("Home", "Welcome.", pages))
    for page in pages:
        site.put(page, html(page, "A page."))
        site.delays[page] = 0.05
    _, documents = crawl(load_settings(workspace=tmp_path / "ws", crawl_concurrency=2), site.url + "/")
    assert len(documents) == 9
    assert site.max_in_flight <= 2


def test_a_slow_page_is_skipped_after_crawl_timeout_s(site: Site, tmp_path: Path) -> None:
    site.delays["/guide/config.html"] = 1.0
    report, documents = crawl(load_settings(workspace=tmp_path / "ws", crawl_timeout_s=0.2), site.url + "/")
    assert sorted(documents) == ["/", "/guide/install.html"]
    assert report.skipped == [("/guide/config.html", "timed out after 0.2s (crawl_timeout_s)")]


def test_pages_that_are_not_html_are_skipped_with_the_reason(site: Site, tmp_path: Path) -> None:
    site.put("/manual.pdf", b"%PDF-1.7", "application/pdf")
    site.put("/data", b'{"a": 1}', "application/json")
    site.put("/", html("Home", "Welcome.", ["/manual.pdf", "/data", "/gone.html"]))
    report, _ = crawl(load_settings(workspace=tmp_path / "ws"), site.url + "/")
    assert report.skipped == [
        ("/data", "not HTML (application/json)"),
        ("/gone.html", "HTTP 404"),
    ]  # .pdf not asked


def ftkit_ingest(runner: CliRunner, spec: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--workspace", "ws", "ingest", spec])
    return result.exit_code, result.stderr


def test_an_unreachable_site_is_one_line_and_exit_1(runner: CliRunner) -> None:
    with SiteServer(Site()) as server:
        port = server.server_address[1]  # bound, then closed: nothing listens there
    code, err = ftkit_ingest(runner, f"http://127.0.0.1:{port}/")
    assert code == 1
    assert err.startswith(f"Error: http://127.0.0.1:{port}: unreachable (")
    assert err.endswith(") — check the URL and your network\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("path", "body", "content_type", "message"),
    [
        (
            "/sitemap.xml",
            "<html><body>not xml",
            "text/html",
            "{url}/sitemap.xml: not an XML sitemap (line 1, column 19) — pass a sitemap.xml URL or the site's start page",
        ),
        (
            "/sitemap.xml",
            "<rss><channel/></rss>",
            "application/xml",
            "{url}/sitemap.xml: not a sitemap (the root element is <rss>) — pass a sitemap.xml URL or the site's start page",
        ),
        (
            "/sitemap.xml",
            '<!DOCTYPE x [<!ENTITY a "aaaa">]><urlset>&a;</urlset>',
            "application/xml",
            "{url}/sitemap.xml: unsafe XML refused (EntitiesForbidden(name='a', system_id=None, public_id=None))"
            " — pass the site's start page instead",
        ),
        (
            "/api",
            '{"a": 1}',
            "application/json",
            "{url}/api: not HTML (application/json) — pass the site's start page or its sitemap.xml",
        ),
        (
            "/nothing-here.html",
            None,
            "",
            "{url}/nothing-here.html: HTTP 404 — pass the site's start page or its sitemap.xml",
        ),
    ],
    ids=["sitemap-not-xml", "xml-not-sitemap", "xml-entities", "start-not-html", "start-404"],
)
def test_bad_start_urls_are_one_line_and_exit_1(
    runner: CliRunner, site: Site, path: str, body: str | None, content_type: str, message: str
) -> None:
    if body is not None:
        site.put(path, body, content_type)
    code, err = ftkit_ingest(runner, site.url + path)
    assert (code, err) == (1, "Error: " + message.format(url=site.url) + "\n")


def test_a_site_whose_robots_txt_forbids_everything_gives_no_documents(runner: CliRunner, site: Site) -> None:
    site.put("/robots.txt", "User-agent: *\nDisallow: /\n", "text/plain")
    code, err = ftkit_ingest(runner, site.url + "/")
    assert (code, err) == (
        1,
        f"Error: {site.url}/: disallowed by robots.txt — pass the site's start page or its sitemap.xml\n",
    )
    assert site.requested("/") == []
