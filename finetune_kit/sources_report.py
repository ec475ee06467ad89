"""`ftkit sources`: each ingested source with what it holds now, read without side effects."""

from dataclasses import asdict, dataclass
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.store import Store

_QUERY = """
    SELECT s.kind, s.spec, s.last_sync,
        (SELECT count(*) FROM documents d WHERE d.source_id = s.id AND d.status = 'active'),
        (SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id
            WHERE d.source_id = s.id AND c.status = 'active'),
        (SELECT count(*) FROM skipped_files k WHERE k.source_id = s.id)
    FROM sources s ORDER BY s.kind, s.spec
"""


@dataclass(frozen=True)
class SourceSummary:
    """One source: its kind and spec, active documents and chunks, files skipped at the last sync."""

    kind: str
    spec: str
    documents: int
    chunks: int
    skipped: int
    last_sync: str | None  # None: never synced to the end

    def line(self) -> str:
        """One plain line for the terminal."""
        return (
            f"{self.spec} ({self.kind}): {self.documents} documents, {self.chunks} chunks,"
            f" {self.skipped} skipped, last sync {self.last_sync or 'never'}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values."""
        return asdict(self)


def list_sources(settings: Settings) -> list[SourceSummary]:
    """Every source the workspace has ingested, by kind then spec."""
    if not settings.db_path.is_file():
        raise FtkitError(
            f"{settings.workspace}: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace"
        )
    with Store(settings.db_path) as store:
        rows = store.db.execute(_QUERY).fetchall()
    return [
        SourceSummary(
            kind=row[0], spec=row[1], last_sync=row[2], documents=row[3], chunks=row[4], skipped=row[5]
        )
        for row in rows
    ]
