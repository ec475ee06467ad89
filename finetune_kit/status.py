"""`ftkit status`: what the workspace holds, the coverage ledger and the cost ledger, read without side effects."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.dataset_report import REPORT_HTML, DatasetSummary, read_dataset_summary
from finetune_kit.errors import FtkitError
from finetune_kit.llm.endpoint import endpoint_identity
from finetune_kit.prompts import load_prompt
from finetune_kit.retrieval.index import index_state
from finetune_kit.stages.build_dataset import CHUNK_ANSWER_KEY, answer_keys
from finetune_kit.stages.estimate import estimate_generation
from finetune_kit.stages.generate_questions import generation_key
from finetune_kit.stages.grounding import REASON_CATEGORY, grounding_line
from finetune_kit.store import Store, run_status

RECENT_RUNS = 5  # runs listed, newest first, with what each one spent
UNRECORDED = "a model and endpoint not recorded (work from before ftkit recorded them)"


@dataclass(frozen=True)
class MadeBy:
    """The questions or answers one model at one endpoint made, and whether the current settings use them."""

    stage: str  # "questions" or "answers"
    endpoint: str | None  # None: made before ftkit recorded who made what
    model: str | None
    done: int  # chunks with a question set, or questions answered
    accepted: int
    current: bool

    def line(self) -> str:
        """`gpt-4o-mini at openai:https://api.openai.com/v1: 35 chunks, 101 accepted (the current settings)`."""
        unit = "chunks" if self.stage == "questions" else "questions answered"
        which = "the current settings" if self.current else "not the current settings"
        return f"{_who(self.endpoint, self.model)}: {self.done} {unit}, {self.accepted} accepted ({which})"


def _who(endpoint: str | None, model: str | None) -> str:
    return f"{model} at {endpoint}" if endpoint and model else UNRECORDED


def current_keys(settings: Settings, identity: str, model: str) -> tuple[str, dict[str, str]]:
    """The generation key and the answer keys the settings select at this endpoint and model."""
    q_key = generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)
    return q_key, answer_keys(settings, identity, model)


@dataclass
class StatusReport:
    """A snapshot of one workspace."""

    workspace: Path
    endpoint: str = ""
    model: str = ""
    made_by: list[MadeBy] = field(default_factory=list)
    redo: list[str] = field(default_factory=list)  # what the next stages would do again, and why
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
    grounding: str = ""  # which grounding gates the current settings use
    dataset: DatasetSummary | None = None  # what the last build-dataset wrote, from its report.json
    dataset_report: Path | None = None
    ledger: list[tuple[str, int, int, int, float]] = field(default_factory=list)  # stage, calls, in, out, $
    runs: list[tuple[int, str, str, str, int, float]] = field(
        default_factory=list
    )  # id, command, status, start, calls, $
    index: str = "none — `ftkit index` builds it"  # the search index: chunks, windows, embedder, threshold

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table."""
        rows = [(f"source ({kind})", f"{spec} — last sync {synced}") for spec, kind, synced in self.sources]
        rows += [(f"{m.stage} made by", m.line()) for m in self.made_by]
        rows.append(("current settings", f"{self.model} at {self.endpoint}"))
        rows += [("settings changed", line) for line in self.redo]
        rows += [
            ("documents (active / retired)", f"{self.documents} / {self.documents_retired}"),
            ("files skipped", _join(self.skipped)),
            ("chunks", str(self.chunks)),
            ("chunks with questions", str(self.chunks_with_questions)),
            ("chunks not yet processed", str(self.chunks_pending)),
            ("chunks without questions", _join(self.chunks_without_questions)),
            ("questions", _join(self.questions)),
            ("answers", _join(self.answers)),
            ("search index", self.index),
            ("grounding check", self.grounding),
        ]
        if self.dataset is not None:
            rows += [*self.dataset.status_lines(), ("dataset report", str(self.dataset_report))]
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
    """Read the workspace's state: who made its work, and what the current settings select and would redo."""
    identity, model = endpoint_identity(settings)
    q_key, a_keys = current_keys(settings, identity, model)
    if not settings.db_path.is_file():
        raise FtkitError(
            f"{settings.workspace}: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace"
        )
    report = StatusReport(workspace=settings.workspace, endpoint=identity, model=model)
    report.grounding = grounding_line(settings)
    report.dataset = read_dataset_summary(settings.dataset_path)
    report.dataset_report = settings.dataset_path / REPORT_HTML
    with Store(settings.db_path) as store:
        report.made_by = made_by(store, q_key, a_keys)
        report.redo = redo_lines(store, settings, identity, model)
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
        if (state := index_state(store)) is not None:
            report.index = state.line(settings.retrieval.threshold)
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
            f"SELECT coalesce({REASON_CATEGORY}, 'accepted'), count(*) FROM answers a JOIN questions q ON q.id = a.question_id"
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
            (row[0], row[1], run_status(row[2], row[6], row[7]), row[3], row[4], row[5])
            for row in store.db.execute(
                "SELECT r.id, r.command, r.status, r.started_at, count(c.request_hash), coalesce(sum(c.cost_usd), 0),"
                " r.pid, r.pid_started"
                " FROM runs r LEFT JOIN llm_calls c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id DESC LIMIT ?",
                (RECENT_RUNS,),
            )
        ]
    return report


def made_by(store: Store, q_key: str, a_keys: dict[str, str]) -> list[MadeBy]:
    """Every model and endpoint that made questions or answers of active chunks, most work first."""
    found = []
    for stage, sql in (("questions", _QUESTIONS_BY_KEY), ("answers", _ANSWERS_BY_KEY)):
        totals: dict[tuple[str | None, str | None, bool], list[int]] = {}
        for row in store.db.execute(sql):
            current = row["key"] == q_key if stage == "questions" else row["key"] in a_keys.values()
            counts = totals.setdefault((row["endpoint"], row["model"], current), [0, 0])
            counts[0] += row["done"]
            counts[1] += row["accepted"]
        found += [MadeBy(stage, e, m, done, ok, cur) for (e, m, cur), (done, ok) in totals.items()]
    return sorted(found, key=lambda m: (m.stage != "questions", not m.current, -m.done))


_QUESTIONS_BY_KEY = """
    SELECT s.generation_key AS key, o.endpoint, o.model, count(*) AS done,
           (SELECT count(*) FROM questions q JOIN chunks qc ON qc.id = q.chunk_id
             WHERE q.generation_key = s.generation_key AND q.status = 'accepted' AND qc.status = 'active') AS accepted
    FROM question_sets s JOIN chunks c ON c.id = s.chunk_id LEFT JOIN work_origins o ON o.key = s.generation_key
    WHERE c.status = 'active' GROUP BY s.generation_key"""
_ANSWERS_BY_KEY = """
    SELECT a.answer_key AS key, o.endpoint, o.model, count(*) AS done, sum(a.status = 'accepted') AS accepted
    FROM answers a JOIN questions q ON q.id = a.question_id JOIN chunks c ON c.id = q.chunk_id
    LEFT JOIN work_origins o ON o.key = a.answer_key
    WHERE c.status = 'active' GROUP BY a.answer_key"""


REDONE = "they will be made again"
UNUSED = (
    "build-dataset uses none of them — run generate-questions with these settings first, or return to those"
)


def question_redo(
    store: Store, settings: Settings, identity: str, model: str, stage: str = "generate-questions"
) -> str | None:
    """One line when chunks have questions from other settings only: generate-questions asks them again."""
    q_key, _ = current_keys(settings, identity, model)
    rows = store.db.execute(
        "SELECT o.endpoint, o.model, count(DISTINCT s.chunk_id) AS n FROM question_sets s"
        " JOIN chunks c ON c.id = s.chunk_id LEFT JOIN work_origins o ON o.key = s.generation_key"
        " WHERE c.status = 'active' AND s.generation_key != :key AND s.chunk_id NOT IN"
        " (SELECT chunk_id FROM question_sets WHERE generation_key = :key) GROUP BY 1, 2 ORDER BY 3 DESC",
        {"key": q_key},
    ).fetchall()
    then = REDONE if stage == "generate-questions" else UNUSED
    return _redo_line(stage, "chunks have questions", rows, identity, model, then)


def answer_redo(store: Store, settings: Settings, identity: str, model: str) -> str | None:
    """One line when build-dataset would answer again questions already answered under other settings."""
    q_key, a_keys = current_keys(settings, identity, model)
    rows = store.db.execute(
        "SELECT o.endpoint, o.model, count(DISTINCT q.id) AS n FROM questions q JOIN chunks c ON c.id = q.chunk_id"
        " JOIN documents d ON d.id = c.document_id JOIN answers a ON a.question_id = q.id"
        " LEFT JOIN work_origins o ON o.key = a.answer_key"
        f" WHERE c.status = 'active' AND q.generation_key = :q_key AND q.status = 'accepted'"
        f" AND a.answer_key != {CHUNK_ANSWER_KEY} AND NOT EXISTS (SELECT 1 FROM answers b"
        f" WHERE b.question_id = q.id AND b.answer_key = {CHUNK_ANSWER_KEY}) GROUP BY 1, 2 ORDER BY 3 DESC",
        {"q_key": q_key, **a_keys},
    ).fetchall()
    return _redo_line("build-dataset", "questions have answers", rows, identity, model, REDONE)


def _redo_line(stage: str, what: str, rows: list[Any], identity: str, model: str, then: str) -> str | None:
    if not rows:
        return None
    n = sum(row["n"] for row in rows)
    makers = ", ".join(_who(row["endpoint"], row["model"]) for row in rows)
    same = all((row["endpoint"], row["model"]) == (identity, model) for row in rows)
    why = (
        "other settings of this model (product, prompts, questions per chunk, temperature or max tokens)"
        if same
        else f"{makers}, not the current {model} at {identity}"
    )
    return f"{stage}: {n} {what} from {why}; {then}"


def redo_lines(store: Store, settings: Settings, identity: str, model: str) -> list[str]:
    """What the next generate-questions and build-dataset would make again, with their estimated calls."""
    questions = question_redo(store, settings, identity, model)
    answers = answer_redo(store, settings, identity, model)
    if questions is None and answers is None:
        return []
    calls = {e.stage: f"{e.calls:,}" for e in estimate_generation(store, settings)}
    if questions is not None:
        costs = (
            f"next generate-questions: about {calls['generate-questions']} calls, then build-dataset about"
        )
        return [f"{questions} ({costs} {calls['build-dataset']})"]
    return [f"{answers} (next build-dataset: about {calls['build-dataset']} calls)"]
