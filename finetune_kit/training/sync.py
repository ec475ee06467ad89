"""Settle the jobs nobody watched to their end: their models join the registry, then the sinks.

Reading the registry (`registered_models`, `servable_models`) never syncs; settling is this explicit step.
"""

from pathlib import Path

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.store import Store
from finetune_kit.training.registry import RegisteredModel, list_models
from finetune_kit.training.watch import WatchResult, sync_jobs


def settle_jobs(settings: Settings, hosted: bool = False, publish: bool = False) -> list[str]:
    """`sync_registry` on the workspace's state DB (nothing to settle without one); a line for each thing done."""
    if not settings.db_path.is_file():
        return []
    with Store(settings.db_path) as store:
        return sync_registry(settings, store, hosted=hosted, publish=publish)


def registered_models(settings: Settings) -> list[RegisteredModel]:
    """The registry as it is, newest first: no service is asked, nothing is written."""
    if not settings.db_path.is_file():
        return []
    with Store(settings.db_path) as store:
        return list_models(store)


def sync_registry(settings: Settings, store: Store, hosted: bool = False, publish: bool = False) -> list[str]:
    """Poll once every job no watch saw finish — local ones always (a DB read), hosted ones with `hosted` and a
    key — registering what succeeded and, with `publish`, writing to the sinks what they lack; a line for each."""
    from finetune_kit.training.local_backend import LocalBackend
    from finetune_kit.training.sinks import publish_pending

    curve_dir = settings.workspace / "training"
    results = sync_jobs(store, LocalBackend(store, settings.workspace), curve_dir)
    lines: list[str] = []
    if hosted and settings.openai_api_key:
        try:
            results += _sync_hosted(settings, store, curve_dir)
        except FtkitError as exc:  # the registry still lists what it has; the next call tries again
            lines.append(f"Hosted jobs not refreshed: {exc}")
    lines += [f"Job {r.job.id} {r.job.status} while nobody watched" + _registered(r.model) for r in results]
    return lines + (publish_pending(settings, store) if publish else [])


def _sync_hosted(settings: Settings, store: Store, curve_dir: Path) -> list[WatchResult]:
    from finetune_kit.training import open_backend

    with open_backend(settings, "openai") as backend:
        return sync_jobs(store, backend, curve_dir)


def _registered(model: RegisteredModel | None) -> str:
    return f": registered {model.name}" if model else ""


def servable_models(store: Store) -> list[RegisteredModel]:
    """Registered models something can answer with, newest first: hosted ones, and local ones llama.cpp serves."""
    from finetune_kit.llm.local_server import served_adapters

    served = {adapter.name for adapter in served_adapters(store)}
    return [model for model in list_models(store) if model.backend != "local" or model.name in served]
