"""Turn training updates and results into terminal lines (cli.py does the printing)."""

import json
from dataclasses import asdict
from datetime import datetime

from finetune_kit.training import JobStarted, TrainingFinished, TrainingUpdate, WatchStarted
from finetune_kit.training.backend import StepMetrics
from finetune_kit.training.jobs import StartedJob
from finetune_kit.training.registry import RegisteredModel
from finetune_kit.training.watch import (
    EventReceived,
    FinishEstimated,
    MetricsReceived,
    StatusChanged,
    WatchResult,
    WatchUpdate,
)


def started_line(started: StartedJob) -> str:
    """What `ftkit train` did: created a job, or found the one these inputs started."""
    record = started.record
    if started.created:
        files = f"uploaded {started.uploaded} file{'s' if started.uploaded != 1 else ''}"
        return f"Started fine-tuning job {record.id} on {record.base_model} ({files}; dataset {record.dataset_hash})."
    return f"Job {record.id} already exists for this dataset and these parameters ({record.status}); nothing uploaded."


def training_lines(update: TrainingUpdate) -> list[str]:
    """The lines `ftkit train` prints for one update of `run_training` or `watch_training`."""
    if isinstance(update, JobStarted):
        return [started_line(update.started)]
    if isinstance(update, WatchStarted):
        record = update.record
        return [f"Watching job {record.id} ({record.status}). Ctrl-C detaches; the job keeps running."]
    if isinstance(update, TrainingFinished):
        outcome = update.outcome
        finished = result_lines(outcome.result, outcome.training_price) if outcome.result else []
        return finished + outcome.published
    line = update_line(update)
    return [line] if line is not None else []


def update_line(update: WatchUpdate) -> str | None:
    """One line per update; a metrics event is shown once, as its metrics."""
    if isinstance(update, StatusChanged):
        return f"status: {update.previous} → {update.job.status}"
    if isinstance(update, FinishEstimated):
        return f"estimated finish: {_clock(update.at)}"
    if isinstance(update, MetricsReceived):
        return metrics_line(update.metrics)
    if isinstance(update, EventReceived) and update.event.step_metrics is None:
        level = "" if update.event.level == "info" else f"{update.event.level.upper()}: "
        return f"{_clock(update.event.created_at)} {level}{update.event.message}"
    return None


def metrics_line(metrics: StepMetrics) -> str:
    """`step 3/10  train loss 1.2345  valid loss 1.4000`."""
    parts = [f"step {metrics.step}" + (f"/{metrics.total_steps}" if metrics.total_steps else "")]
    for label, value in (("train loss", metrics.train_loss), ("valid loss", metrics.valid_loss)):
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    if metrics.tokens_per_s is not None:
        parts.append(f"{metrics.tokens_per_s:.0f} tokens/s")
    return "  ".join(parts)


def result_lines(result: WatchResult, training_price_per_million: float = 0.0) -> list[str]:
    """How the job ended, what it trained on and cost, the registered model and the loss curve."""
    lines = [f"Job {result.job.id} {result.job.status}."]
    if result.model is not None:
        lines.append(f"Fine-tuned model: {result.model.name} (registered; `ftkit models` lists it)")
        lines.append(f'Try it: ftkit ask "your question" --model {result.model.name}')
    tokens = result.metrics.get("trained_tokens")
    if tokens:
        cost = tokens * training_price_per_million / 1_000_000
        lines.append(f"Trained tokens: {tokens:,} (estimated cost ${cost:.2f})")
    losses = [
        f"{k.replace('_', ' ')} {result.metrics[k]:.4f}"
        for k in ("train_loss", "valid_loss")
        if k in result.metrics
    ]
    if losses:
        lines.append("Final " + ", ".join(losses))
    if result.loss_curve is not None:
        lines.append(f"Loss curve: {result.loss_curve}")
    return lines


def models_lines(models: list[RegisteredModel]) -> list[str]:
    """One line per registered model, newest first (whole names: they are what you paste into --model)."""
    lines = []
    for model in models:
        losses = [
            f"{k.replace('_', ' ')} {model.metrics[k]:.4f}"
            for k in ("train_loss", "valid_loss")
            if k in model.metrics
        ]
        details = [
            f"{model.backend}, from {model.base_model}",
            f"job {model.job_id}",
            model.created_at,
            *losses,
        ]
        lines.append(f"{model.name}  ({'; '.join(details)})")
    return lines


def models_json(models: list[RegisteredModel]) -> str:
    """The registry as a JSON list, newest first."""
    return json.dumps([asdict(model) for model in models], indent=2)


def _clock(unix_s: int) -> str:
    return datetime.fromtimestamp(unix_s).astimezone().strftime("%Y-%m-%d %H:%M:%S")
