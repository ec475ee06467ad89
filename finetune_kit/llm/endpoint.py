"""Pick the endpoint for the configured provider: OpenAI (or any compatible base URL) or the embedded server."""

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.errors import ConfigError
from finetune_kit.llm.client import Endpoint, LLMClient
from finetune_kit.llm.local_server import local_server, model_fingerprint, resolve_model_path

if TYPE_CHECKING:
    from finetune_kit.store import Store

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# llama.cpp's server decodes one request at a time on the CPU: a second in flight only waits, and times out
LOCAL_SERVER_IN_FLIGHT = 1


@contextlib.contextmanager
def open_endpoint(settings: Settings) -> Iterator[Endpoint]:
    """The endpoint generation calls go to; the embedded server lives exactly as long as this context."""
    if settings.resolved_provider == "openai":
        yield openai_endpoint(settings)
        return
    with local_server(settings) as server:
        yield Endpoint(
            base_url=server.base_url,
            api_key="local",
            model=settings.model or LOCAL_MODEL_ALIAS,
            identity=local_identity(server.model_path),
            price=settings.price_for(LOCAL_MODEL_ALIAS),
            max_in_flight=LOCAL_SERVER_IN_FLIGHT,
        )


@contextlib.contextmanager
def open_model_endpoint(settings: Settings, model: str) -> Iterator[Endpoint]:
    """The endpoint that answers as `model`: the embedded server for the base model and local fine-tunes
    (whatever the provider), else the configured provider."""
    local = model == LOCAL_MODEL_ALIAS or is_local_model(settings, model)
    provider = "local" if local else settings.provider
    if local or settings.resolved_provider == "local":
        _check_served(settings, model)
    with open_endpoint(settings.model_copy(update={"model": model, "provider": provider})) as endpoint:
        yield endpoint


def is_local_model(settings: Settings, model: str) -> bool:
    """True if `model` was fine-tuned by the local backend of this workspace."""
    if not settings.db_path.exists():
        return False
    from finetune_kit.store import Store

    with Store(settings.db_path) as store:
        backend = store.scalar("SELECT backend FROM finetuned_models WHERE name = ?", (model,))
        if backend is None:
            backend = (
                "local"
                if store.scalar("SELECT 1 FROM local_jobs WHERE fine_tuned_model = ?", (model,))
                else None
            )
    return backend == "local"


def _check_served(settings: Settings, name: str) -> None:
    """llama.cpp's server answers a name it does not know with its first model: refuse such a name up front."""
    from finetune_kit.llm.local_server import server_config

    served = {
        entry["model_alias"] for entry in server_config(settings, resolve_model_path(settings))["models"]
    }
    if name not in served:
        raise ConfigError(
            f"model {name} is not served by the embedded server of {settings.workspace} — `ftkit models` lists"
            " the fine-tuned models (a local model trained on a checkpoint folder, not a GGUF, cannot be served)"
        )


def local_identity(model_path: Path) -> str:
    """The cache identity of the embedded server: the model file it loads, not its port."""
    return "local:" + model_fingerprint(model_path)


def endpoint_identity(settings: Settings) -> tuple[str, str]:
    """(identity, model) of the endpoint `settings` select, without starting or calling anything."""
    if settings.resolved_provider == "openai":
        base_url = (settings.openai_base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
        return "openai:" + base_url, settings.generation_model
    return local_identity(resolve_model_path(settings)), settings.model or LOCAL_MODEL_ALIAS


def openai_endpoint(settings: Settings) -> Endpoint:
    """OpenAI itself, Azure's v1 endpoint, vLLM, Ollama… anything that speaks the OpenAI API."""
    base_url = (settings.openai_base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if key is None and base_url == OPENAI_DEFAULT_BASE_URL:
        raise ConfigError(
            "provider 'openai' needs an API key — export OPENAI_API_KEY, or use --provider local for the embedded model"
        )
    model = settings.generation_model
    return Endpoint(
        base_url=base_url,
        api_key=key or "not-needed",
        model=model,
        identity="openai:" + base_url,
        price=settings.price_for(model),
    )


@contextlib.asynccontextmanager
async def one_call_client(store: "Store", settings: Settings) -> AsyncIterator[LLMClient]:
    """A cached client on the generation endpoint for a call or two (one in flight), closed afterwards."""
    with open_endpoint(settings) as endpoint:
        client = LLMClient(
            endpoint,
            store,
            max_concurrency=1,
            max_retries=settings.max_retries,
            timeout_s=settings.request_timeout_s,
        )
        try:
            yield client
        finally:
            await client.close()
