"""The `ftkit` command line: parse flags, build settings, call the library, print the result."""

import contextlib
import copy
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from finetune_kit.config import (
    FLAT_NAMES,
    HOSTED_BASE_MODEL,
    LOCAL_MODEL_ALIAS,
    Settings,
    load_settings,
    setting_default,
)
from finetune_kit.errors import FtkitError

if TYPE_CHECKING:
    from finetune_kit.chat import ChatEvent
    from finetune_kit.training import TrainingOutcome

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


GLOBAL_OPTIONS = ("workspace", "config", "debug")  # the root's options, accepted after any command too


class _FtkitGroup(TyperGroup):
    """Turns FtkitError into one `Error: …` line and exit code 1 (`--debug` shows the traceback)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        given_once = [param for param in self.params if param.name in GLOBAL_OPTIONS]
        if given_once:  # the root group: every command below it accepts the same options
            _accept_after_command(self, given_once)

    def invoke(self, ctx: Any) -> Any:  # typer 0.29 vendors its own click; stay agnostic
        try:
            return super().invoke(ctx)
        except FtkitError as exc:
            _report(ctx, f"Error: {exc}")
        except KeyboardInterrupt:
            _report(
                ctx,
                "Interrupted — finished work is saved in the workspace; re-run the same command to continue.",
            )


def _accept_after_command(group: Any, options: list[Any]) -> None:
    """Give every command under `group` a copy of the root's `options` that overrides the root's value."""
    for command in group.commands.values():
        known = {param.name for param in command.params}
        for option in options:
            if option.name not in known:
                after = copy.copy(option)
                after.expose_value, after.callback = False, _override_global
                command.params.append(after)
        if hasattr(command, "commands"):
            _accept_after_command(command, options)


def _override_global(ctx: Any, param: Any, value: Any) -> Any:
    """A global option given after the command wins over the same option before it."""
    if value is not None and value is not False:
        root = ctx.find_root()
        root.obj = root.obj or {}
        root.obj[param.name] = value
    return value


def _report(ctx: typer.Context, message: str) -> None:
    if (ctx.obj or {}).get("debug") or os.environ.get("FTKIT_DEBUG"):
        traceback.print_exc()
    err.print(_redact(message), markup=False)
    raise typer.Exit(1)


def _redact(text: str) -> str:
    """Never print a key, even if a server echoed it back."""
    for name in (
        "OPENAI_API_KEY",
        "SLACK_BOT_TOKEN",
        "SLACK_APP_TOKEN",
        "SLACK_SIGNING_SECRET",
        "AIRTABLE_API_KEY",
    ):
        key = os.environ.get(name)
        text = text.replace(key, "***") if key and len(key) > 4 else text
    return text


app = typer.Typer(
    cls=_FtkitGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ANYWHERE = " Before or after the command (after wins)."
SETTING_NAMES = set(Settings.model_fields) | set(FLAT_NAMES)  # a parameter with one of these names is a flag


def _shown(value: Any) -> str:
    """A default as `--help` shows it: 60 not 60.0, yes/no, a list joined."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def _default(setting: str, text: str) -> str:
    """`text` with the setting's own default appended, so a changed default cannot leave the help behind."""
    return f"{text} (default: {_shown(setting_default(setting))})."


WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        metavar="DIR",
        help=_default("workspace", "Workspace folder (env FTKIT_WORKSPACE)") + ANYWHERE,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", metavar="FILE", help="Settings file (default ./ftkit.toml if present)." + ANYWHERE
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors." + ANYWHERE)]


@app.callback()
def _global(
    ctx: typer.Context, workspace: WorkspaceOpt = None, config: ConfigOpt = None, debug: DebugOpt = False
) -> None:
    """Turn your documentation into a fine-tuning dataset and a support model you own.

    --workspace/-w, --config and --debug work before the command and after it (`ftkit run docs -w ws`, `ftkit
    train watch -w ws`); given in both places, the one after the command wins.
    """
    ctx.obj = {"workspace": workspace, "config": config, "debug": debug}


def _settings(ctx: typer.Context) -> Settings:
    """Settings with this command's flags on top: every parameter named after a setting is one.

    A grouped setting's parameter has its flat name: `slack_temperature` sets [slack] temperature.
    """
    obj = ctx.find_root().obj or {}
    # a repeatable option that was not given arrives as (); it must not hide ftkit.toml's list
    flags = {k: v for k, v in ctx.params.items() if k in SETTING_NAMES and v != ()}
    if flags.get("dataset_dir") is None and ctx.params.get("out") is not None:
        flags["dataset_dir"] = ctx.params["out"]  # --out, the old name of --dataset
    with _warnings_on_stderr("finetune_kit.config"):
        return load_settings(obj.get("config"), workspace=obj.get("workspace"), **flags)


@contextlib.contextmanager
def _warnings_on_stderr(logger_name: str) -> Iterator[None]:
    """Show the warnings `logger_name` logs meanwhile (an old ftkit.toml key) as `Warning: …` lines."""

    class Printer(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            err.print(f"Warning: {record.getMessage()}", markup=False, emoji=False)

    logger, printer = logging.getLogger(logger_name), Printer(logging.WARNING)
    logger.addHandler(printer)
    try:
        yield
    finally:
        logger.removeHandler(printer)


Include = Annotated[
    list[str] | None, typer.Option("--include", metavar="GLOB", help="Glob of files to read (repeatable).")
]
Exclude = Annotated[
    list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Glob of files to skip (repeatable).")
]
Code = Annotated[
    bool | None,
    typer.Option("--code/--no-code", help=_default("include_code", "Also read source-code files")),
]
ChunkTokens = Annotated[
    int | None,
    typer.Option(
        "--chunk-tokens", metavar="N", help=_default("chunk_target_tokens", "Target chunk size in tokens")
    ),
]
IndexOnIngest = Annotated[
    bool | None,
    typer.Option(
        "--index/--no-index",
        help=_default("retrieval_index_on_ingest", "Then bring the search index up to date (ftkit index)"),
    ),
]
Provider = Annotated[
    str | None,
    typer.Option(
        "--provider",
        metavar="auto|local|openai",
        help=_default("provider", "auto, local (embedded model) or openai"),
    ),
]
Model = Annotated[
    str | None, typer.Option("--model", metavar="NAME", help="Model that writes questions and answers.")
]
Product = Annotated[
    str | None,
    typer.Option("--product", metavar="NAME", help=_default("product", "Product name used in the prompts")),
]
PerChunk = Annotated[
    int | None,
    typer.Option(
        "--questions-per-chunk",
        "-n",
        metavar="N",
        help=_default("questions_per_chunk", "Questions per chunk"),
    ),
]
DatasetDir = Annotated[
    Path | None,
    typer.Option(
        "--dataset",
        metavar="DIR",
        help="Dataset folder: build-dataset and run write train.jsonl there, train reads it"
        " (setting dataset_dir; default <workspace>/dataset).",
    ),
]
OldDatasetFlag = Annotated[
    Path | None, typer.Option("--out", metavar="DIR", hidden=True, help="Old --dataset.")
]
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="chat|prompt-completion",
        help=_default("dataset_format", "chat or prompt-completion"),
    ),
]
BaseModel = Annotated[
    str | None, typer.Option("--base-model", metavar="NAME", help="Model to fine-tune, for limits and cost.")
]
Epochs = Annotated[
    int | None,
    typer.Option("--epochs", metavar="N", help=_default("epochs", "Training epochs, for the cost estimate")),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", metavar="N", help=_default("split_seed", "Seed of the train/validation split")),
]
MinExamples = Annotated[
    int | None,
    typer.Option(
        "--min-examples",
        metavar="N",
        help=_default(
            "min_examples",
            "Fewest training examples build-dataset writes and train uploads (OpenAI's minimum is 10)",
        ),
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the calls, tokens and dollars it would spend; send nothing.")
]
MaxCost = Annotated[
    float | None,
    typer.Option(
        "--max-cost", metavar="USD", help="Stop cleanly before this run spends more than USD dollars."
    ),
]
Batch = Annotated[
    bool | None,
    typer.Option(
        "--batch/--no-batch",
        help=_default("batch", "Use the OpenAI Batch API (half price, results within 24 h)"),
    ),
]
Sources = Annotated[
    list[str],
    typer.Argument(
        metavar="SOURCE",
        help="Folders, files, git repositories (path or clone URL), Airtable tables (airtable:BASE_ID/TABLE),"
        " Slack export .zip files or websites (https://host/sitemap.xml or a start page).",
    ),
]
AirtableView = Annotated[
    str | None,
    typer.Option("--airtable-view", metavar="VIEW", help="Airtable: read only this view's records."),
]
AirtableFormula = Annotated[
    str | None,
    typer.Option(
        "--airtable-formula", metavar="FORMULA", help="Airtable: only records matching this formula."
    ),
]
AirtableTitle = Annotated[
    str | None,
    typer.Option(
        "--airtable-title-field",
        metavar="FIELD",
        help=_default("airtable_title_field", "Airtable: field holding the title"),
    ),
]
AirtableBody = Annotated[
    list[str] | None,
    typer.Option(
        "--airtable-body-field",
        metavar="FIELD",
        help=_default("airtable_body_fields", "Airtable: field holding text (repeatable)"),
    ),
]
AirtableUrl = Annotated[
    str | None,
    typer.Option(
        "--airtable-url-field",
        metavar="FIELD",
        help="Airtable: field holding the URL (default: the record's page).",
    ),
]


def _progress() -> Any:
    from finetune_kit.render import RichProgress

    return RichProgress.make_bar(err)


def _print_summary(summary: Any) -> None:
    from finetune_kit.render import dataset_lines, estimate_table, summary_table

    if summary.estimates:
        out.print(estimate_table(summary.estimates))
        out.print("Dry run: nothing was sent. Cached calls are free and left out.", markup=False)
        return
    out.print(summary_table(summary))
    if summary.dataset is not None:
        for line in dataset_lines(summary.dataset):
            out.print(line, markup=False)
        if summary.dataset.problems:
            raise FtkitError(summary.dataset.problems[0])


@app.command()
def ingest(
    ctx: typer.Context,
    sources: Sources,
    include: Include = None,
    exclude: Exclude = None,
    include_code: Code = None,
    chunk_target_tokens: ChunkTokens = None,
    airtable_view: AirtableView = None,
    airtable_formula: AirtableFormula = None,
    airtable_title_field: AirtableTitle = None,
    airtable_body_fields: AirtableBody = None,
    airtable_url_field: AirtableUrl = None,
    retrieval_index_on_ingest: IndexOnIngest = None,
) -> None:
    """Read docs (folders, files, git repos, Airtable, Slack exports, websites) into documents and chunks.

    A SOURCE is a folder or file; a git repository (a local clone, read in place, or a clone URL), whose documents
    link to their permalinks at the ingested commit; an Airtable table (airtable:BASE_ID/TABLE, key from
    AIRTABLE_API_KEY); a Slack export .zip (one document per thread); or an http(s):// website (its sitemap.xml or
    a start page, crawled within its host). --include, --exclude and --code apply to files only; the --airtable-*
    options map a table's fields to documents.

    Re-running is incremental: an unchanged file, record or page costs nothing, an edited one becomes a new
    version, a deleted one is retired with its chunks. What a source may hold is bounded (max_file_bytes per file,
    HTML and reST nesting depth) and nothing that resolves outside a source's root is read, through any chain of
    links; a file past a bound is skipped with its reason and the rest is read. Given several sources, one that
    yields no usable document is reported and the others go on (exit 0); only when none is usable is it an error.
    """
    from finetune_kit.pipeline import run_ingest
    from finetune_kit.render import RichProgress, ingest_lines

    with _progress() as bar:
        report = run_ingest(_settings(ctx), sources, RichProgress(bar))
    for line in ingest_lines(report):
        out.print(line, markup=False)
    if report.index is not None:
        _say_index(report.index)


def _say_index(report: Any) -> None:
    """The index's summary line on stdout, its warning (an index without vectors) on stderr."""
    if report.warning:
        err.print(f"Warning: {report.warning}", markup=False, emoji=False)
    _say(report.line())


@app.command("generate-questions")
def generate_questions(
    ctx: typer.Context,
    provider: Provider = None,
    model: Model = None,
    product: Product = None,
    questions_per_chunk: PerChunk = None,
    max_cost_usd: MaxCost = None,
    batch: Batch = None,
    dry_run: DryRun = False,
) -> None:
    """Have the model write N questions per chunk; chunks already done are skipped.

    --provider and --model pick the endpoint; --product names the product in the prompt. Every rejected question
    is recorded with its reason (ftkit status shows them). Spending controls, on every paid stage: --dry-run
    prints the calls, tokens and worst-case dollars it would spend, and the calls per chunk size range, and sends
    nothing; --max-cost stops cleanly before the run could spend more (calls already in flight finish and are
    kept; re-run with a higher budget to continue); --batch sends the calls through the OpenAI Batch API at half
    price (results within 24 hours; the batch id is stored first, so a killed wait re-attaches instead of paying
    again).
    """
    from finetune_kit.pipeline import run_generate_questions
    from finetune_kit.render import RichProgress

    with _progress() as bar:
        summary = run_generate_questions(_settings(ctx), RichProgress(bar), dry_run)
    _print_summary(summary)


@app.command("build-dataset")
def build_dataset(
    ctx: typer.Context,
    dataset_dir: DatasetDir = None,
    out: OldDatasetFlag = None,
    dataset_format: Format = None,
    provider: Provider = None,
    model: Model = None,
    product: Product = None,
    base_model: BaseModel = None,
    epochs: Epochs = None,
    split_seed: Seed = None,
    min_examples: MinExamples = None,
    max_cost_usd: MaxCost = None,
    batch: Batch = None,
    dry_run: DryRun = False,
) -> None:
    """Answer each question from its chunk and write validated train/validation JSONL.

    train.jsonl and validation.jsonl go into --dataset DIR (the setting dataset_dir, the folder ftkit train reads).
    --base-model and --epochs size the token-limit check and the cost estimate; a dataset that the fine-tuning
    service would reject (too few examples, malformed lines, examples over the model's token limit) is refused
    with exit 1 and its files are kept for inspection. --provider, --model, --product, --dry-run, --max-cost and
    --batch as for generate-questions.
    """
    from finetune_kit.pipeline import run_build_dataset
    from finetune_kit.render import RichProgress

    with _progress() as bar:
        summary = run_build_dataset(_settings(ctx), RichProgress(bar), dry_run)
    _print_summary(summary)


@app.command()
def run(
    ctx: typer.Context,
    sources: Sources,
    include: Include = None,
    exclude: Exclude = None,
    include_code: Code = None,
    chunk_target_tokens: ChunkTokens = None,
    retrieval_index_on_ingest: IndexOnIngest = None,
    provider: Provider = None,
    model: Model = None,
    product: Product = None,
    questions_per_chunk: PerChunk = None,
    dataset_dir: DatasetDir = None,
    out: OldDatasetFlag = None,
    dataset_format: Format = None,
    base_model: BaseModel = None,
    epochs: Epochs = None,
    split_seed: Seed = None,
    min_examples: MinExamples = None,
    max_cost_usd: MaxCost = None,
    batch: Batch = None,
    train_after_dataset: Annotated[
        bool | None,
        typer.Option(
            "--train/--no-train",
            help="Go on to fine-tune on the dataset and follow the job (default: only with the local backend).",
        ),
    ] = None,
    dry_run: DryRun = False,
) -> None:
    """Run every stage: ingest, generate-questions and build-dataset, then train and follow the job.

    Questions and answers overlap: a chunk's answers are asked as soon as its questions are stored (with --batch,
    every question comes first: a batch is one round). It takes every option of the three stages, shows progress
    bars and ends with a summary table (documents,
    chunks, questions, answers, rejects by reason, tokens, cost, output files); with --dry-run it ingests (free),
    then prints the estimate. Then it fine-tunes on the dataset and follows the job like ftkit train --watch: by
    default only when the training backend is local (no key set) — a hosted job costs money and a self-hosted
    OPENAI_BASE_URL server may not fine-tune at all, so with a key ask for it with --train.
    """
    from finetune_kit.pipeline import run_all
    from finetune_kit.render import RichProgress

    settings = _settings(ctx)
    with _progress() as bar:
        summary = run_all(settings, sources, RichProgress(bar), dry_run)
    _print_summary(summary)
    if settings.trains_after_dataset and not dry_run:
        _train(settings, watch=True)


@app.command()
def status(
    ctx: typer.Context, provider: Provider = None, model: Model = None, product: Product = None
) -> None:
    """Show documents, chunk coverage (and why chunks have no questions), answers and LLM cost.

    It shows what the workspace holds whichever settings are current: sources, which model at which endpoint
    made its questions and answers (and how many), documents, skipped files by reason, chunks with and without
    questions (and why), answers by outcome (the grounding check's and near duplicates' rejects among them), the
    grounding gates in use, the last dataset's summary (its report.html), and the LLM ledger per stage.
    --provider, --model and --product give the current settings; when they differ from those that made the work,
    a "settings changed" row says what the next generate-questions and build-dataset would make again, with their
    estimated calls.
    """
    from finetune_kit.render import status_table
    from finetune_kit.status import workspace_status

    out.print(status_table(workspace_status(_settings(ctx))))


@app.command()
def index(
    ctx: typer.Context,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Drop the index and its vectors and build it again (after changing embedding_model).",
        ),
    ] = False,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help='Calibrate the "I don\'t know" threshold again (an index without one is calibrated anyway).',
        ),
    ] = False,
) -> None:
    """Build or update the search index over the active chunks, with a progress bar and a summary.

    Every active chunk is indexed lexically (SQLite FTS5: its document's title, heading path and text) and densely
    as windows that fit the embedder ([retrieval] window_tokens, window_overlap_tokens), so no part of a long chunk
    is invisible to search. Vectors are stored by window text hash: an unchanged corpus embeds nothing, an edited
    file only its changed chunks, and retired chunks leave the index. ingest and run keep the index current by
    themselves. An index built with another embedding_model is refused until --rebuild; without a local embedder
    installed the index is lexical only (said on stderr, with the extra to install).

    An index with no "I don't know" threshold yet is then calibrated once the workspace has 10 generated
    questions: they are the answerable side, built-in off-topic questions and model-written ones the docs
    never mention (one cached call) the other; the threshold with the best balanced accuracy is stored with the
    index and both refusal rates are printed. [retrieval] threshold overrides it.
    """
    from finetune_kit.pipeline import run_index
    from finetune_kit.render import RichProgress

    settings = _settings(ctx)
    with _progress() as bar:
        report = run_index(settings, rebuild, RichProgress(bar))
    _say_index(report)
    _calibrate(settings, again=calibrate)


def _calibrate(settings: Settings, again: bool) -> None:
    """Calibrate the "I don't know" threshold (`--calibrate`, or an index not calibrated yet) and say both rates."""
    from finetune_kit.render import RichProgress
    from finetune_kit.retrieval.calibrate import calibrate_workspace

    with _progress() as bar, _warnings_on_stderr("finetune_kit.retrieval.calibrate"):
        result = calibrate_workspace(settings, RichProgress(bar), only_if_uncalibrated=not again)
    if result is not None:
        (_say if result.threshold is not None else _note)(result.line())


def _note(line: str) -> None:
    """One plain line on stderr."""
    err.print(line, markup=False, emoji=False)


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[
        str, typer.Argument(metavar="QUERY", help="What to look for, quoted.", show_default=False)
    ],
    retrieval_k: Annotated[
        int | None, typer.Option("-k", "--k", metavar="N", help=_default("retrieval_k", "Chunks to show"))
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
    retrieval_mmr: Annotated[
        bool | None,
        typer.Option("--mmr/--no-mmr", help=_default("retrieval_mmr", "Diversify the hits with MMR")),
    ] = None,
) -> None:
    """Search the index: the chunks that best match QUERY, ranked by hybrid (BM25 + dense) retrieval.

    Prints rank, score (reciprocal-rank fusion), the document's path as stored (relative to its source), the
    chunk's heading path, its URL and a snippet around the best-matching window; --json prints a list of objects
    with those fields plus chunk_id and text. The words of QUERY are searched as words, never as FTS syntax; a
    query of only common words is refused as too vague, and one longer than max_query_chars is cut (said on
    stderr). An empty or missing index says to run `ftkit index`.
    """
    import json

    from finetune_kit.retrieval.search import hit_json, search_workspace

    with _warnings_on_stderr("finetune_kit.retrieval.search"):
        hits = search_workspace(_settings(ctx), query)
    if as_json:
        typer.echo(json.dumps([hit_json(hit) for hit in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        _say("No chunk matches that query.")
        return
    out.print(_hits_table(hits))


def _hits_table(hits: list[Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", show_lines=True)
    for column in ("rank", "score", "path", "heading", "URL", "snippet"):
        table.add_column(column, overflow="fold", justify="right" if column in ("rank", "score") else "left")
    for hit in hits:
        cells = (str(hit.rank), f"{hit.score:.4f}", hit.path, hit.heading, hit.url, hit.snippet)
        table.add_row(*(Text(cell) for cell in cells))  # Text: a doc's "[...]" is not rich markup
    return table


@app.command("sources")
def sources_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sources as JSON.")] = False,
) -> None:
    """List each ingested source: its documents, chunks, skipped files and last sync.

    Per source: its kind (directory, file, git, airtable, slack-export, website), spec, active documents, active
    chunks, files skipped at its last sync, and when that was; --json prints the same fields as JSON.
    """
    import json

    from finetune_kit.sources_report import list_sources

    found = list_sources(_settings(ctx))
    if as_json:
        typer.echo(json.dumps([source.as_dict() for source in found], indent=2))
        return
    if not found:
        _say("No sources yet — `ftkit ingest DOCS` adds one.")
        return
    for source in found:
        _say(source.line())


@app.command()
def refresh(
    ctx: typer.Context,
    generate: Annotated[
        bool,
        typer.Option("--generate", help="Then write questions for the chunks that lack them (the new ones)."),
    ] = False,
    provider: Provider = None,
    model: Model = None,
    product: Product = None,
) -> None:
    """Read every source the workspace knows again, re-index what changed, and say what changed per source.

    Folders and files are read again, git repositories cloned from a URL are fetched (a local clone is read as it
    is), websites are re-crawled with conditional GETs (a page answering 304 costs nothing), Airtable tables and
    Slack exports are read again. Per source it prints the documents added, changed, retired and unchanged and
    the chunks added and retired; a source that cannot be read (its folder is gone, the network is down) is
    reported and the others go on. Then the retrieval index follows the chunks (only new text is embedded).
    --generate then has the model write questions for the chunks that lack them, so only new chunks cost calls
    (--provider, --model and --product as for generate-questions). Meant for cron or a systemd timer.
    """
    from finetune_kit.pipeline import run_refresh
    from finetune_kit.render import RichProgress

    with _progress() as bar:
        report, summary = run_refresh(_settings(ctx), RichProgress(bar), generate)
    for change in report.sources:
        _say(change.line())
    if report.index is not None:
        _say_index(report.index)
    if summary is not None:
        _print_summary(summary)


BotModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="NAME",
        help="Model that answers (default: newest fine-tuned, else the base model).",
    ),
]
Host = Annotated[
    str | None,
    typer.Option("--host", metavar="HOST", help=_default("slack_host", "HTTP mode: address to listen on")),
]
Port = Annotated[
    int | None,
    typer.Option(
        "--port", metavar="PORT", help=_default("slack_port", "HTTP mode: port, 0 picks a free one")
    ),
]
Channels = Annotated[
    list[str] | None,
    typer.Option(
        "--channel", metavar="ID", help="Answer only in this channel ID (repeatable; default: all)."
    ),
]
Dms = Annotated[
    bool | None, typer.Option("--dms/--no-dms", help=_default("slack_answer_dms", "Answer direct messages"))
]
SystemPrompt = Annotated[
    str | None,
    typer.Option(
        "--system-prompt", metavar="TEXT", help="System prompt (default: the dataset's, as trained)."
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option("--temperature", metavar="T", help=_default("slack_temperature", "Sampling temperature")),
]
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens", metavar="N", help=_default("slack_max_answer_tokens", "Longest answer in tokens")
    ),
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help=_default("slack_timeout_s", "Give up on the model after this long"),
    ),
]
Concurrency = Annotated[
    int | None,
    typer.Option("--concurrency", metavar="N", help=_default("slack_concurrency", "Model calls at once")),
]
Stream = Annotated[
    bool | None,
    typer.Option("--stream/--no-stream", help=_default("slack_stream", "Show the answer as it is written")),
]


Rag = Annotated[
    bool | None,
    typer.Option(
        "--rag/--no-rag",
        help=_default(
            "retrieval_rag",
            "Answer from the chunks the index retrieves, citing them; without an index, --rag is an error, and"
            " unset it answers from the model alone",
        ),
    ),
]


@app.command()
def slack(
    ctx: typer.Context,
    slack_model: BotModel = None,
    provider: Provider = None,
    product: Product = None,
    slack_host: Host = None,
    slack_port: Port = None,
    slack_allowed_channels: Channels = None,
    slack_answer_dms: Dms = None,
    slack_system_prompt: SystemPrompt = None,
    slack_temperature: Temperature = None,
    slack_max_answer_tokens: MaxTokens = None,
    slack_timeout_s: Timeout = None,
    slack_concurrency: Concurrency = None,
    slack_stream: Stream = None,
    retrieval_rag: Rag = None,
) -> None:
    """Answer questions in Slack threads with the support model (Socket Mode or HTTP events).

    Socket Mode when SLACK_APP_TOKEN is set; otherwise it serves Slack's Events API over HTTP on --host and --port
    at /slack/events, verifying each request with SLACK_SIGNING_SECRET, with GET /healthz for load balancers. A
    missing SLACK_BOT_TOKEN, or neither SLACK_APP_TOKEN nor SLACK_SIGNING_SECRET, is a one-line error naming the
    variable and where to find its value. --timeout bounds each model call from when it starts. Without --model
    it first registers the local jobs that finished while nobody watched (said on stderr), then answers with the
    newest fine-tuned model; it never asks the fine-tuning service nor writes to Airtable. With --rag (the default
    once `ftkit index` built an index) it answers from the retrieved docs as `ftkit ask --rag` does, with a Slack
    link to each source an answer cites, refuses questions the docs do not cover, answers a thread's follow-ups
    with the thread as history, and records the chunks behind each answer in slack_answer_chunks (joined to 👍/👎
    by answer_id).
    """
    import logging

    from finetune_kit.retrieval.answer import docs_for_bot
    from finetune_kit.slack.bot import ReadyInfo, serve

    debug = (ctx.find_root().obj or {}).get("debug") or os.environ.get("FTKIT_DEBUG")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    for noisy in ("slack_bolt", "slack_sdk", "httpx2", "openai"):  # bolt warns of the client we pass it
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)

    def ready(info: ReadyInfo) -> None:
        where = (
            f"Listening for Slack events at {info.url}" if info.url else "Connected to Slack in Socket Mode"
        )
        docs = " from the docs" if info.from_docs else ""
        out.print(f"{where}, answering with {info.model}{docs}. Ctrl-C stops.", markup=False)

    settings = _settings(ctx)
    if settings.slack.model is None:
        _settle(settings)
    try:
        serve(settings, ready, docs_for_bot(settings, retrieval_rag))
    except KeyboardInterrupt:
        out.print("Stopped. Questions left unanswered are answered at the next start.", markup=False)


train_app = typer.Typer(
    cls=_FtkitGroup,
    help="Fine-tune a model on the dataset and follow the job (re-attachable).",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(train_app, name="train")

Watch = Annotated[bool, typer.Option("--watch", help="Follow the job to its end (exit 1 if it fails).")]
TrainBaseModel = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        metavar="NAME",
        help=f"Model to fine-tune: hosted default {HOSTED_BASE_MODEL}; local default {LOCAL_MODEL_ALIAS},"
        " or a .gguf file or checkpoint folder.",
    ),
]
TrainEpochs = Annotated[
    int | None, typer.Option("--epochs", metavar="N", help=_default("epochs", "Training epochs"))
]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", metavar="N", help="Examples per batch (default: the service picks)."),
]
LearningRate = Annotated[
    float | None,
    typer.Option("--learning-rate-multiplier", metavar="X", help="Learning-rate multiplier (default: auto)."),
]
Suffix = Annotated[
    str | None, typer.Option("--suffix", metavar="TEXT", help="Added to the fine-tuned model's name.")
]
TrainSeed = Annotated[int | None, typer.Option("--seed", metavar="N", help="Seed of the training run.")]
TrainBackend = Annotated[
    str | None,
    typer.Option(
        "--backend",
        metavar="auto|openai|local",
        help=_default(
            "training_backend",
            "openai (or Azure via OPENAI_BASE_URL), or local LoRA on this machine; auto: openai with a key",
        ),
    ),
]
LoraRank = Annotated[
    int | None, typer.Option("--lora-rank", metavar="N", help=_default("lora_rank", "Local: LoRA rank"))
]
LoraAlpha = Annotated[
    int | None, typer.Option("--lora-alpha", metavar="N", help=_default("lora_alpha", "Local: LoRA alpha"))
]
TrainThreads = Annotated[
    int | None,
    typer.Option("--threads", metavar="N", help="Local on CPU: torch threads (default: all cores)."),
]
MaxLength = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        metavar="TOKENS",
        help=_default("training_max_length", "Local: tokens per example; longer ones are cut"),
    ),
]
JobArg = Annotated[
    str | None, typer.Argument(metavar="[JOB]", help="Job id (default: the newest job).", show_default=False)
]


@train_app.callback(invoke_without_command=True)
def train(
    ctx: typer.Context,
    watch: Watch = False,
    base_model: TrainBaseModel = None,
    epochs: TrainEpochs = None,
    training_batch_size: BatchSize = None,
    learning_rate_multiplier: LearningRate = None,
    training_suffix: Suffix = None,
    training_seed: TrainSeed = None,
    training_backend: TrainBackend = None,
    dataset_dir: DatasetDir = None,
    min_examples: MinExamples = None,
    lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None,
    training_threads: TrainThreads = None,
    training_max_length: MaxLength = None,
) -> None:
    """Upload the dataset and start a fine-tune, or re-attach to the job these inputs started.

    Files already uploaded are not sent again, and a train.jsonl with fewer than --min-examples examples is
    refused before anything is uploaded. The same dataset and parameters re-attach to the job they started
    instead of starting another. --watch follows the job to its end: exit 0 when it succeeds, 1 when it fails or
    is cancelled, 130 when Ctrl-C detaches (the job keeps running). --backend openai is OpenAI or, through
    OPENAI_BASE_URL, Azure OpenAI; local trains a LoRA adapter on this machine (needs the train extra) over the
    embedded model, a .gguf file or a checkpoint folder, served afterwards by the embedded llama.cpp server.
    """
    if ctx.invoked_subcommand is not None:
        return
    _train(_settings(ctx), watch)


def _train(settings: Settings, watch: bool) -> None:
    from finetune_kit.training import run_training

    outcome = _following(lambda show: run_training(settings, watch, show))
    if not watch:
        _say(f"Follow it with `ftkit train watch {outcome.record.id}`.")


@train_app.command("watch")
def train_watch(ctx: typer.Context, job: JobArg = None) -> None:
    """Re-attach to a fine-tuning job and follow it to its end (exit 1 if it fails).

    JOB is a job in the state DB (default: the newest); only what was not printed before is printed.
    """
    from finetune_kit.training import watch_training

    settings = _settings(ctx)
    _following(lambda show: watch_training(settings, job, show))


@train_app.command("cancel")
def train_cancel(ctx: typer.Context, job: JobArg = None) -> None:
    """Cancel a fine-tuning job (default: the newest job)."""
    from finetune_kit.training import cancel_training

    cancelled = cancel_training(_settings(ctx), job)
    _say(f"Asked to cancel job {cancelled.id}: now {cancelled.status}.")


class _TrainingPrinter:
    """Prints each training update as it comes, remembering the job being watched for the Ctrl-C line."""

    def __init__(self) -> None:
        self.watching: str | None = None

    def __call__(self, update: Any) -> None:
        from finetune_kit.training import TrainingFinished, WatchStarted
        from finetune_kit.training.report import training_lines

        if isinstance(update, WatchStarted):
            self.watching = update.record.id
        elif isinstance(update, TrainingFinished):
            self.watching = None  # the job ended: nothing left to detach from
        for line in training_lines(update):
            _say(line)


def _following(run: "Callable[[_TrainingPrinter], TrainingOutcome]") -> "TrainingOutcome":
    """Run a training call with a printer; Ctrl-C while watching detaches (exit 130) and leaves the job running."""
    printer = _TrainingPrinter()
    try:
        return run(printer)
    except KeyboardInterrupt:
        if printer.watching is None:
            raise
        job = printer.watching
        _say(f"Detached from job {job}; it keeps running. `ftkit train watch {job}` re-attaches.")
        raise typer.Exit(130) from None


@app.command()
def ask(
    ctx: typer.Context,
    question: Annotated[
        str, typer.Argument(metavar="QUESTION", help="The question, quoted.", show_default=False)
    ],
    ask_model: Annotated[
        str | None,
        typer.Option("--model", metavar="NAME", help="Model to ask (default: the newest fine-tuned model)."),
    ] = None,
    retrieval_rag: Rag = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print answer, model, refused, query, sources [{n, url, path, heading, score, title, chunk_id}]"
            " and retrieved (the hits, without their text) as JSON.",
        ),
    ] = False,
    slack_max_answer_tokens: MaxTokens = None,
    slack_temperature: Temperature = None,
    slack_system_prompt: SystemPrompt = None,
) -> None:
    """Ask one question and print the answer, from the docs with the sources it cites (as the Slack bot would).

    It asks the newest fine-tuned model in the registry (or --model NAME; --model smollm2-135m-instruct asks the
    untuned base) through the same endpoint as the Slack bot. With --rag (the default once `ftkit index` built an
    index) the model answers from the retrieved chunks alone (prompts/grounded_answer.txt), citing them as [1],
    [2]; the Sources under the answer are the retrieved chunks it cites, never a number or link it made up, and an
    answer citing nothing says so. When the best chunk scores below the relevance threshold (retrieval.threshold,
    else the one `ftkit index --calibrate` stored), or the model says the docs do not cover the question, the
    answer is one sentence saying so; below the threshold no model is asked. --no-rag asks the model alone, with
    --system-prompt. The answer goes to stdout (the model's name to stderr), so scripts can use it. A local model
    trained over a Hugging Face folder rather than a GGUF has no adapter llama.cpp can serve and is passed over as
    the default. Without --model it first registers the local jobs that finished while nobody watched (a read of
    the workspace, said on stderr); it never asks the fine-tuning service nor writes to Airtable.
    """
    from finetune_kit.ask import answer_json, answer_lines, ask_question

    settings = _settings(ctx)
    if ask_model is None:
        _settle(settings)
    with _warnings_on_stderr("finetune_kit.ask"):
        answer = ask_question(settings, question, ask_model, retrieval_rag)
    err.print(f"[{answer.model}]", markup=False, emoji=False)  # stdout holds the answer alone, for scripts
    if as_json:
        typer.echo(answer_json(answer, question))
        return
    for line in answer_lines(answer):
        _say(line)


@app.command()
def chat(
    ctx: typer.Context,
    session: Annotated[
        str | None,
        typer.Option("--session", metavar="NAME", help="Resume the conversation called NAME (or start it)."),
    ] = None,
    chat_model: Annotated[
        str | None,
        typer.Option("--model", metavar="NAME", help="Model to answer with (default: as `ftkit ask --rag`)."),
    ] = None,
) -> None:
    """Talk with the docs in the terminal: `ftkit ask --rag` with memory kept in the workspace.

    Each message is answered from the retrieved chunks, with the sources it cites; a follow-up ("and how do I
    rotate it?") is first condensed with the conversation into one standalone question (one cached model call).
    The conversation is stored in the state database: --session NAME resumes the newest conversation called
    NAME (and starts it if there is none). Type /new to start a new conversation, /quit (or end of input, Ctrl-D)
    to end. Answers go to stdout, everything else to stderr.
    """
    from finetune_kit.chat import run_chat

    settings = _settings(ctx)
    if chat_model is None:
        _settle(settings)
    conversation = run_chat(settings, _read_chat_line, _show_chat_event, session, chat_model)
    err.print(f"Resume with: ftkit chat --session {conversation.name}", markup=False, emoji=False)


def _read_chat_line() -> str | None:
    """The next line typed, or None at the end of input; the prompt goes to stderr."""
    err.print("> ", end="", markup=False)
    line = sys.stdin.readline()
    return line if line else None


def _show_chat_event(event: "ChatEvent") -> None:
    """Print one event of `ftkit chat`: the answer and its sources on stdout, the rest on stderr."""
    from finetune_kit.chat import Answered, NotAnswered, Started

    if isinstance(event, Started):
        earlier = f", {event.turns} earlier turns" if event.turns else ""
        line = f"Conversation {event.conversation.name}{earlier} — /new starts another, /quit ends"
        err.print(line, markup=False, emoji=False)
    elif isinstance(event, NotAnswered):
        err.print(f"No answer: {event.reason}", markup=False, emoji=False)
    elif isinstance(event, Answered):
        answer = event.answer
        _say(answer.answer)
        for source in answer.sources:
            _say(f"  [{source.n}] {source.heading or source.path} — {source.url}")
        if answer.cited_nothing and not answer.refused:
            err.print("(the answer cites no source)", markup=False, emoji=False)


@app.command()
def models(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
    sync: Annotated[
        bool,
        typer.Option(
            "--sync/--no-sync",
            help="First settle the jobs nobody watched to their end: ask the service once about each, register"
            " what succeeded and record it in the Airtable models table, each said on stderr (default: yes).",
        ),
    ] = True,
) -> None:
    """List the fine-tuned models in the registry, newest first; --no-sync lists it as it is, changing nothing.

    Each with backend, base model, job, date and final losses; --json prints name, backend, base_model, job_id,
    dataset_hash, created_at and metrics. With --sync (the default) it first settles the jobs that ended while
    nobody watched: it asks the service once about each (hosted ones only with a key), registers what succeeded
    and records it in the Airtable models table when [airtable] models_table is set, retrying a write that failed
    before, saying each on stderr.
    """
    from finetune_kit.training.report import models_json, models_lines
    from finetune_kit.training.sync import registered_models

    settings = _settings(ctx)
    if sync:
        _settle(settings, hosted=True, publish=True)
    registered = registered_models(settings)
    if as_json:
        typer.echo(models_json(registered))
        return
    for line in models_lines(registered) or [
        "No fine-tuned models yet — `ftkit train --watch` registers them."
    ]:
        _say(line)


EvalRuns = Annotated[
    tuple[str, str] | None,
    typer.Option(
        "--compare", metavar="RUN_A RUN_B", help="Show what changed between two eval runs; run nothing."
    ),
]


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    arms: Annotated[
        str | None,
        typer.Option(
            "--arms",
            metavar="LIST",
            help="Arms to run, of base,ft,rag,ft+rag (default: every one that exists).",
        ),
    ] = None,
    eval_model: Annotated[
        str | None,
        typer.Option(
            "--model", metavar="NAME", help="The base model (default: the model fine-tuning starts from)."
        ),
    ] = None,
    ft_model: Annotated[
        str | None,
        typer.Option(
            "--ft-model", metavar="NAME", help="The fine-tuned model (default: the newest registered)."
        ),
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(
            "--judge-model", metavar="NAME", help="The judge (default: the model that writes questions)."
        ),
    ] = None,
    judge: Annotated[
        bool, typer.Option("--judge/--no-judge", help="Grade with the judge (no: judge-free scores only).")
    ] = True,
    questions_file: Annotated[
        Path | None,
        typer.Option(
            "--questions", metavar="FILE", help="JSONL of questions to ask instead of the held-out ones."
        ),
    ] = None,
    held_out: Annotated[
        bool | None,
        typer.Option(
            "--held-out/--no-held-out", help="Ask the held-out questions (default: unless --questions)."
        ),
    ] = None,
    unanswerable: Annotated[
        bool | None,
        typer.Option(
            "--unanswerable/--no-unanswerable",
            help="Add questions the docs cannot answer, written by the model and checked against the index"
            " (default: with the held-out ones).",
        ),
    ] = None,
    run_name: Annotated[
        str | None, typer.Option("--name", metavar="RUN", help="Run folder name (default: the UTC time).")
    ] = None,
    compare: EvalRuns = None,
    provider: Provider = None,
    product: Product = None,
    slack_max_answer_tokens: MaxTokens = None,
    max_cost_usd: MaxCost = None,
    batch: Batch = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    dry_run: DryRun = False,
) -> None:
    """Does fine-tuning pay? Ask base, fine-tuned, retrieval and both the same held-out questions and score them.

    The questions are the accepted ones of the validation split's chunks (never trained on), each with its answer
    as the reference and its document as the gold source; --questions FILE.jsonl asks a team's own (one object a
    line: question, reference, gold_paths, answerable, history, id; a bad line is one error naming it, and nothing
    runs). Unless --no-unanswerable, questions the docs cannot answer join the held-out ones: the model writes
    them as `ftkit index --calibrate` does (the same cached call) and any that the index's words or the
    workspace's questions may answer is dropped; refusal accuracy counts them. Arms without a model or an index
    are skipped with a note. Every answer and verdict goes through the
    request cache: a re-run pays nothing and a new arm pays only for itself; --dry-run, --max-cost and --batch as
    for generate-questions (with --batch the answers go through one round of batches, then the judge's verdicts
    on them through a second; what a batch could not answer is asked live). The judge grades with the rubric in prompts/eval_judge.txt at temperature 0; a reply
    without a verdict is asked once more, then counted as unjudged. It prints one row per arm with 95 %
    intervals and writes report.html, report.md, results.jsonl, chart.png and summary.json to
    <workspace>/eval/<run>/; --compare RUN_A RUN_B shows what changed between two runs.
    """
    import json

    from finetune_kit.eval.report import compare_table, load_summary, summary_table
    from finetune_kit.eval.run import EvalOptions, run_eval
    from finetune_kit.render import RichProgress, estimate_table

    settings = _settings(ctx)
    if compare is not None:
        out.print(compare_table(*(load_summary(settings.workspace, run) for run in compare)))
        return
    from finetune_kit.eval.arms import parse_arm_names

    options = EvalOptions(
        parse_arm_names(arms),
        eval_model,
        ft_model,
        judge_model,
        judge,
        questions_file,
        held_out,
        run_name,
        dry_run,
        unanswerable,
    )
    with _progress() as bar:
        outcome = run_eval(settings, options, RichProgress(bar))
    for name, why in outcome.skipped.items():
        err.print(f"{name} skipped: {why}", markup=False, emoji=False)
    if outcome.summary is None:
        table = estimate_table(outcome.estimates)
        table.caption = None  # its note is about generation; eval's notes follow
        out.print(table)
        for line in [*outcome.notes, "Dry run: nothing was sent. Cached calls are free and left out."]:
            _say(line)
        return
    if as_json:
        typer.echo(json.dumps(outcome.summary.to_json(), indent=2, ensure_ascii=False))
        return
    out.print(summary_table(outcome.summary, width=out.width))
    _say(f"Report: {outcome.run_dir}/report.html")


def _settle(settings: Settings, hosted: bool = False, publish: bool = False) -> None:
    """Settle the jobs nobody watched (see `training.sync.settle_jobs`), saying on stderr what that did."""
    from finetune_kit.training.sync import settle_jobs

    for line in settle_jobs(settings, hosted=hosted, publish=publish):
        err.print(line, markup=False, emoji=False)


def _say(line: str) -> None:
    """One plain line on stdout: no markup, no emoji codes (model names hold colons)."""
    out.print(line, markup=False, emoji=False)


def _terminate(signum: int, frame: object) -> None:
    """Treat SIGTERM like Ctrl-C, so the embedded server is stopped and the run recorded as interrupted."""
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="ftkit")


if __name__ == "__main__":
    main()
