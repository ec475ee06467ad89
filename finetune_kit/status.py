"""`ftkit status`: what the workspace holds, the coverage ledger and the cost ledger, read without side effects."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.llm.endpoint import endpoint_identity
from finetune_kit.prompts import load_prompt
from finetune_kit.stages.build_dataset import CHUNK_ANSWER_KEY, answer_keys
from finetune_kit.stages.generate_questions import generation_key
from finetune_kit.store import Store

RECENT_RUNS = 5  # runs listed, newest first, with what each one spent


@dataclass
class StatusReport:
    """A snapshot of one workspace."""

    workspace: Path
    sources: list[tuple[str, str, str]] = field(default_factory=list)  # spec, kind, last sync
    documents: int = 0
    documents_retired: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    chunks_with_questions: int = 0
    chunks_pending: int = 0
    chunks_without_questions: dict[str, int] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)  # "accepted" or reject reason → count
    answers: dict[str, int] = field(default_factory=dict)
    ledger: list[tuple[str, int, int, int, float]] = field(default_factory=list)  # stage, calls, in, out, $
    runs: list[tuple[int, str, str, str, int, float]] = field(
        default_factory=list
    )  # id, command, status, start, calls, $

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table."""
        rows = [(f"source ({kind})", f"{spec} — last sync {synced}") for spec, kind, synced in self.sources]
        rows += [
            ("documents (active / retired)", f"{self.documents} / {self.documents_retired}"),
            ("files skipped", _join(self.skipped)),
            ("chunks", str(self.chunks)),
            ("chunks with questions", str(self.chunks_with_questions)),
            ("chunks not yet processed", str(self.chunks_pending)),
            ("chunks without questions", _join(self.chunks_without_questions)),
            ("questions", _join(self.questions)),
            ("answers", _join(self.answers)),
        ]
        rows += [
            (f"LLM {stage}", f"{calls} calls, {tin:,} in / {tout:,} out tokens, ${cost:.4f}")
            for stage, calls, tin, tout, cost in self.ledger
        ]
        rows += [
            (f"run {run_id}", f"{command} — {status}, {started}, {calls} calls, ${cost:.4f}")
            for run_id, command, status, started, calls, cost in self.runs
        ]
        return rows


def _join(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items()) or "none"


def _counts(store: Store, sql: str, params: tuple[object, ...] | Mapping[str, object] = ()) -> dict[str, int]:
    return {str(row[0]): int(row[1]) for row in store.db.execute(sql, params)}


def workspace_status(settings: Settings) -> StatusReport:
    """Read the workspace's state under the current settings (which select the question and answer sets)."""
    identity, model = endpoint_identity(settings)
    q_key = generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)
    a_keys = answer_keys(settings, identity, model)
    if not settings.db_path.is_file():
        raise FtkitError(
            f"{settings.workspace}: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace"
        )
    report = StatusReport(workspace=settings.workspace)
    with Store(settings.db_path) as store:
        report.sources = [
            (r[0], r[1], r[2] or "never")
            for r in store.db.execute("SELECT spec, kind, last_sync FROM sources")
        ]
        docs = _counts(store, "SELECT status, count(*) FROM documents GROUP BY status")
        report.documents, report.documents_retired = docs.get("active", 0), docs.get("retired", 0)
        report.skipped = _counts(
            store, "SELECT reason, count(*) FROM skipped_files GROUP BY reason ORDER BY 2 DESC"
        )
        report.chunks = int(store.scalar("SELECT count(*) FROM chunks WHERE status = 'active'") or 0)
        active_sets = (
            "FROM question_sets s JOIN chunks c ON c.id = s.chunk_id"
            " WHERE c.status = 'active' AND s.generation_key = ?"
        )
        report.chunks_with_questions = int(
            store.scalar(f"SELECT count(*) {active_sets} AND s.n_accepted > 0", (q_key,)) or 0
        )
        done = int(store.scalar(f"SELECT count(*) {active_sets}", (q_key,)) or 0)
        report.chunks_pending = report.chunks - done
        report.chunks_without_questions = _counts(
            store,
            f"SELECT s.reason, count(*) {active_sets} AND s.n_accepted = 0 GROUP BY s.reason ORDER BY 2 DESC",
            (q_key,),
        )
        report.questions = _counts(
            store,
            "SELECT coalesce(reason, 'accepted'), count(*) FROM questions WHERE generation_key = ?"
            " GROUP BY 1 ORDER BY 2 DESC",
            (q_key,),
        )
        report.answers = _counts(
            store,
            "SELECT coalesce(a.reason, 'accepted'), count(*) FROM answers a JOIN questions q ON q.id = a.question_id"
            " JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id"
            f" WHERE a.answer_key = {CHUNK_ANSWER_KEY} GROUP BY 1 ORDER BY 2 DESC",
            a_keys,
        )
        report.ledger = [
            tuple(r)
            for r in store.db.execute(  # type: ignore[misc]
                "SELECT stage, count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) FROM llm_calls GROUP BY stage"
            )
        ]
        report.runs = [
            tuple(row)  # type: ignore[misc]
            for row in store.db.execute(
                "SELECT r.id, r.command, r.status, r.started_at, count(c.request_hash), coalesce(sum(c.cost_usd), 0)"
                " FROM runs r LEFT JOIN llm_calls c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id DESC LIMIT ?",
                (RECENT_RUNS,),
            )
        ]
    return report
