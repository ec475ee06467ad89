from pathlib import Path
from typing import Any

import pytest

from finetune_kit.config import FLAT_NAMES, GROUPS, LOCAL_MODEL_ALIAS, ModelPrice, Settings, load_settings
from finetune_kit.errors import ConfigError
from tests.conftest import REPO, TEST_KEY


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_config() -> None:
    settings = load_settings()

    assert (settings.product, settings.max_concurrency, settings.provider) == ("the product", 256, "auto")
    assert settings.workspace == Path(".ftkit")
    assert settings.db_path == Path(".ftkit/state.db")


def test_ftkit_toml_in_cwd_beats_defaults(tmp_path: Path) -> None:
    write_toml(tmp_path / "ftkit.toml", 'product = "Acme"\nmax_concurrency = 3\n')

    settings = load_settings()

    assert (settings.product, settings.max_concurrency, settings.max_retries) == ("Acme", 3, 4)


def test_config_path_is_read_instead_of_cwd_file(tmp_path: Path) -> None:
    write_toml(tmp_path / "ftkit.toml", 'product = "FromCwd"\nepochs = 7\n')
    other = write_toml(tmp_path / "other.toml", 'product = "FromFlag"\n')

    settings = load_settings(config_file=other)

    assert (settings.product, settings.epochs) == ("FromFlag", 3)


def test_environment_beats_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "ftkit.toml", 'product = "Acme"\nmax_concurrency = 3\n')
    monkeypatch.setenv("FTKIT_PRODUCT", "EnvAcme")

    settings = load_settings()

    assert (settings.product, settings.max_concurrency) == ("EnvAcme", 3)


def test_flags_beat_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "ftkit.toml", 'product = "Acme"\nmax_concurrency = 3\nepochs = 5\n')
    monkeypatch.setenv("FTKIT_PRODUCT", "EnvAcme")
    monkeypatch.setenv("FTKIT_MAX_CONCURRENCY", "4")

    settings = load_settings(product="FlagAcme", max_concurrency=2)

    assert (settings.product, settings.max_concurrency, settings.epochs) == ("FlagAcme", 2, 5)


def test_none_flags_do_not_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "ftkit.toml", 'product = "Acme"\n')
    monkeypatch.setenv("FTKIT_MAX_CONCURRENCY", "4")

    settings = load_settings(product=None, max_concurrency=None, model=None)

    assert (settings.product, settings.max_concurrency, settings.model) == ("Acme", 4, None)


def test_zero_flag_is_kept_not_swallowed() -> None:
    settings = load_settings(max_retries=0, validation_fraction=0.0)

    assert (settings.max_retries, settings.validation_fraction) == (0, 0.0)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'prodcut = "Acme"\n',
            "unknown setting 'prodcut' — check the spelling in ftkit.toml or the FTKIT_* environment",
        ),
        (
            "max_concurrency = 0\n",
            "invalid setting 'max_concurrency': Input should be greater than or equal to 1 "
            "— fix it in ftkit.toml, FTKIT_MAX_CONCURRENCY or the matching flag",
        ),
        (
            'max_concurrency = "lots"\n',
            "invalid setting 'max_concurrency': Input should be a valid integer, unable to parse string as "
            "an integer — fix it in ftkit.toml, FTKIT_MAX_CONCURRENCY or the matching flag",
        ),
        (
            'provider = "azure"\n',
            "invalid setting 'provider': Input should be 'auto', 'local' or 'openai' "
            "— fix it in ftkit.toml, FTKIT_PROVIDER or the matching flag",
        ),
        ("product = \n", "ftkit.toml: Invalid value (at line 1, column 11) — fix the TOML syntax"),
        (
            'openai_api_key = "sk-in-toml"\n',
            "openai_api_key cannot be set in ftkit.toml or FTKIT_* — secrets are read from OPENAI_API_KEY only",
        ),
        (
            'openai_base_url = "http://127.0.0.1:1/v1"\n',
            "openai_base_url cannot be set in ftkit.toml or FTKIT_* "
            "— secrets are read from OPENAI_BASE_URL only",
        ),
    ],
)
def test_bad_toml_gives_exact_message(tmp_path: Path, toml: str, message: str) -> None:
    write_toml(tmp_path / "ftkit.toml", toml)

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == message


def test_bad_config_file_message_names_that_file(tmp_path: Path) -> None:
    custom = write_toml(tmp_path / "custom.toml", "colour = 1\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(config_file=custom)

    assert str(excinfo.value) == (
        f"unknown setting 'colour' — check the spelling in {custom} or the FTKIT_* environment"
    )


def test_invalid_environment_value_gives_exact_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_QUESTION_TEMPERATURE", "3")

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == (
        "invalid setting 'question_temperature': Input should be less than or equal to 2 "
        "— fix it in ftkit.toml, FTKIT_QUESTION_TEMPERATURE or the matching flag"
    )


def test_invalid_flag_gives_exact_message() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(dataset_format="csv")

    assert str(excinfo.value) == (
        "invalid setting 'dataset_format': Input should be 'chat' or 'prompt-completion' "
        "— fix it in ftkit.toml, FTKIT_DATASET_FORMAT or the matching flag"
    )


def test_missing_config_file_gives_exact_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as excinfo:
        load_settings(config_file=missing)

    assert str(excinfo.value) == f"{missing}: config file not found — check the --config path"


def test_openai_secrets_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")

    settings = load_settings()

    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == TEST_KEY
    assert settings.openai_base_url == "http://127.0.0.1:9/v1"


def test_secrets_never_serialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")

    settings = load_settings()
    dumped = settings.model_dump()

    assert {"openai_api_key", "api_key", "openai_base_url"} & set(dumped) == set()
    assert TEST_KEY not in str(dumped)
    assert TEST_KEY not in settings.model_dump_json()
    assert "127.0.0.1:9" not in settings.model_dump_json()
    assert TEST_KEY not in repr(settings)


def test_empty_openai_environment_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("OPENAI_BASE_URL", "")

    settings = load_settings()

    assert (settings.openai_api_key, settings.openai_base_url, settings.resolved_provider) == (
        None,
        None,
        "local",
    )


@pytest.mark.parametrize(
    ("env", "provider"),
    [
        ({}, "local"),
        ({"OPENAI_API_KEY": TEST_KEY}, "openai"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "openai"),
        ({"OPENAI_API_KEY": TEST_KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "openai"),
        ({"OPENAI_API_KEY": TEST_KEY, "FTKIT_PROVIDER": "local"}, "local"),
        ({"FTKIT_PROVIDER": "openai"}, "openai"),
    ],
)
def test_resolved_provider(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], provider: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert load_settings().resolved_provider == provider


@pytest.mark.parametrize(
    ("env", "flags", "base_model", "generation_model"),
    [
        ({}, {}, LOCAL_MODEL_ALIAS, LOCAL_MODEL_ALIAS),
        ({"OPENAI_API_KEY": TEST_KEY}, {}, "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        (
            {"OPENAI_API_KEY": TEST_KEY},
            {"base_model": "gpt-4.1-nano-2025-04-14"},
            "gpt-4.1-nano-2025-04-14",
            "gpt-4o-mini",
        ),
        ({}, {"model": "fake-model"}, LOCAL_MODEL_ALIAS, "fake-model"),
    ],
)
def test_default_models(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flags: dict[str, Any],
    base_model: str,
    generation_model: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = load_settings(**flags)

    assert (settings.fine_tune_base_model, settings.generation_model) == (base_model, generation_model)


@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("gpt-4o-mini", ModelPrice(input=0.15, output=0.60, training=3.00)),
        ("gpt-4o-mini-2024-07-18", ModelPrice(input=0.30, output=1.20, training=3.00)),
        ("gpt-4o-mini-2030-01-01", ModelPrice(input=0.15, output=0.60, training=3.00)),
        ("gpt-4o-2030-01-01", ModelPrice(input=2.50, output=10.00, training=25.00)),
        ("gpt-4.1-2030-01-01", ModelPrice(input=2.00, output=8.00, training=25.00)),
        ("gpt-4.1-mini-2030-01-01", ModelPrice(input=0.40, output=1.60, training=5.00)),
        ("gpt-4.1-nano-2030-01-01", ModelPrice(input=0.10, output=0.40, training=1.50)),
        ("gpt-4omni", ModelPrice()),
        ("llama-3-8b", ModelPrice()),
        (LOCAL_MODEL_ALIAS, ModelPrice()),
    ],
)
def test_price_for(model: str, price: ModelPrice) -> None:
    assert load_settings().price_for(model) == price


def test_prices_from_toml(tmp_path: Path) -> None:
    write_toml(tmp_path / "ftkit.toml", "[prices.my-model]\ninput = 1.5\noutput = 2.5\n")

    settings = load_settings()

    assert settings.price_for("my-model-v2") == ModelPrice(input=1.5, output=2.5, training=0.0)
    assert settings.price_for("gpt-4o-mini") == ModelPrice(
        input=0.15, output=0.60, training=3.00
    )  # defaults kept


def test_secret_under_the_ftkit_prefix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_OPENAI_API_KEY", "sk-nope")

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == (
        "FTKIT_OPENAI_API_KEY is not read — secrets come from OPENAI_API_KEY only; export that instead"
    )
    assert "sk-nope" not in str(excinfo.value)


def test_tables_set_the_grouped_settings(tmp_path: Path) -> None:
    write_toml(
        tmp_path / "ftkit.toml",
        '[slack]\ntemperature = 0.5\nallowed_channels = ["C0123"]\n[airtable]\nview = "Published"\n'
        "[training]\nlora_rank = 8\nseed = 7\n[crawl]\nmax_pages = 9\n",
    )

    settings = load_settings()

    assert (settings.slack.temperature, settings.slack.allowed_channels) == (0.5, ["C0123"])
    assert (settings.airtable.view, settings.airtable.title_field) == ("Published", "Name")
    assert (settings.training.lora_rank, settings.training.seed, settings.training.lora_alpha) == (8, 7, 32)
    assert (settings.crawl.max_pages, settings.crawl.concurrency) == (9, 4)


def test_an_old_flat_key_still_counts_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_toml(tmp_path / "ftkit.toml", 'slack_temperature = 0.5\nlora_rank = 8\nproduct = "Acme"\n')

    with caplog.at_level("WARNING", logger="finetune_kit.config"):
        settings = load_settings()

    assert (settings.slack.temperature, settings.training.lora_rank, settings.product) == (0.5, 8, "Acme")
    assert caplog.messages == [
        "ftkit.toml: slack_temperature is now [slack] temperature — move it into that table",
        "ftkit.toml: lora_rank is now [training] lora_rank — move it into that table",
    ]


def test_the_table_wins_over_an_old_flat_key(tmp_path: Path) -> None:
    write_toml(tmp_path / "ftkit.toml", "crawl_max_pages = 3\n[crawl]\nmax_pages = 9\n")

    assert load_settings().crawl.max_pages == 9


@pytest.mark.parametrize(
    ("env", "value", "read"),
    [
        ("FTKIT_SLACK_TEMPERATURE", "0.5", lambda s: s.slack.temperature == 0.5),
        ("FTKIT_SLACK_STREAM", "false", lambda s: s.slack.stream is False),
        ("FTKIT_SLACK_ALLOWED_CHANNELS", '["C0123"]', lambda s: s.slack.allowed_channels == ["C0123"]),
        ("FTKIT_SLACK_WORKSPACE_URL", "https://acme.slack.com", lambda s: s.slack.workspace_url is not None),
        ("FTKIT_AIRTABLE_BODY_FIELDS", '["Q", "A"]', lambda s: s.airtable.body_fields == ["Q", "A"]),
        (
            "FTKIT_AIRTABLE_API_URL",
            "http://127.0.0.1:9",
            lambda s: s.airtable.api_url == "http://127.0.0.1:9",
        ),
        ("FTKIT_TRAINING_BACKEND", "local", lambda s: s.training.backend == "local"),
        ("FTKIT_TRAINING_POLL_INTERVAL_S", "0.01", lambda s: s.training.poll_interval_s == 0.01),
        (
            "FTKIT_TRAINING_LAUNCHER",
            '["accelerate", "launch"]',
            lambda s: s.training.launcher[0] == "accelerate",
        ),
        ("FTKIT_LORA_RANK", "8", lambda s: s.training.lora_rank == 8),
        ("FTKIT_LORA_ALPHA", "4", lambda s: s.training.lora_alpha == 4),
        ("FTKIT_LEARNING_RATE_MULTIPLIER", "2", lambda s: s.training.learning_rate_multiplier == 2.0),
        ("FTKIT_CRAWL_MAX_PAGES", "9", lambda s: s.crawl.max_pages == 9),
        ("FTKIT_TRAIN_AFTER_DATASET", "true", lambda s: s.train_after_dataset is True),
    ],
)
def test_todays_environment_names_still_work(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, read: Any
) -> None:
    monkeypatch.setenv(env, value)

    assert read(load_settings())


def test_environment_beats_a_table_and_a_flag_beats_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path / "ftkit.toml", "[slack]\ntemperature = 0.5\nport = 1\nconcurrency = 2\n")
    monkeypatch.setenv("FTKIT_SLACK_PORT", "2")
    monkeypatch.setenv("FTKIT_SLACK_CONCURRENCY", "3")

    settings = load_settings(slack_concurrency=5)

    assert (settings.slack.temperature, settings.slack.port, settings.slack.concurrency) == (0.5, 2, 5)


def test_invalid_grouped_setting_names_its_table_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_SLACK_TEMPERATURE", "3")

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == (
        "invalid setting 'slack.temperature': Input should be less than or equal to 2 "
        "— fix it in ftkit.toml, FTKIT_SLACK_TEMPERATURE or the matching flag"
    )


def test_invalid_unprefixed_training_flag_names_its_environment() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(lora_rank=0)

    assert str(excinfo.value) == (
        "invalid setting 'training.lora_rank': Input should be greater than or equal to 1 "
        "— fix it in ftkit.toml, FTKIT_LORA_RANK or the matching flag"
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[slack]\ncolour = 1\n",
            "unknown setting 'slack.colour' — check the spelling in ftkit.toml or the FTKIT_* environment",
        ),
        (
            '[slack]\nbot_token = "xoxb-in-toml"\n',
            "slack.bot_token cannot be set in ftkit.toml or FTKIT_* — secrets are read from SLACK_BOT_TOKEN only",
        ),
        (
            '[airtable]\napi_key = "patX"\n',
            "airtable.api_key cannot be set in ftkit.toml or FTKIT_* — secrets are read from AIRTABLE_API_KEY only",
        ),
    ],
)
def test_bad_table_gives_exact_message(tmp_path: Path, toml: str, message: str) -> None:
    write_toml(tmp_path / "ftkit.toml", toml)

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == message
    assert "in-toml" not in str(excinfo.value)


def test_a_list_in_the_environment_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_SLACK_ALLOWED_CHANNELS", "C0123,C0456")

    with pytest.raises(ConfigError) as excinfo:
        load_settings()

    assert str(excinfo.value) == (
        'FTKIT_SLACK_ALLOWED_CHANNELS: not a JSON list (Expecting value) — write it as ["first", "second"]'
    )


def test_every_grouped_setting_has_the_flat_name_group_underscore_key() -> None:
    expected = {
        f"{group}_{key}": (group, key)
        for group, model in GROUPS.items()
        for key in model.model_fields
        if key not in {"lora_rank", "lora_alpha", "learning_rate_multiplier"}
    }
    expected |= {name: ("training", name) for name in ("lora_rank", "lora_alpha", "learning_rate_multiplier")}

    assert expected == FLAT_NAMES
    assert not set(FLAT_NAMES) & set(Settings.model_fields)  # a flat name never shadows a top-level setting


def test_the_readmes_example_ftkit_toml_loads_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    section = (REPO / "README.md").read_text().split("## Configuration\n", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    write_toml(tmp_path / "ftkit.toml", example)

    with caplog.at_level("WARNING", logger="finetune_kit.config"):
        settings = load_settings()

    assert caplog.messages == []
    assert (settings.slack.allowed_channels, settings.airtable.view) == (["C0123456789"], "Published")
    assert (settings.training.backend, settings.crawl.max_pages, settings.product) == ("local", 500, "Widget")
