"""`ftkit ask`: one question to a fine-tuned model, answered the way the Slack bot answers."""

from dataclasses import dataclass

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.errors import ConfigError
from finetune_kit.slack.answerer import OnText, OpenAIAnswerer, Turn, registered_model


@dataclass(frozen=True)
class Answer:
    """What a model said, and which model said it."""

    model: str
    text: str


def ask(settings: Settings, question: str, model: str | None = None, on_text: OnText | None = None) -> Answer:
    """Ask `model` (default: the newest registered fine-tuned model) one question."""
    from finetune_kit.llm.endpoint import open_model_endpoint

    if not question.strip():
        raise ConfigError('the question is empty — ftkit ask "How do I …?"')
    name = model or registered_model(settings)
    if name is None:
        raise ConfigError(
            f"no fine-tuned model in {settings.workspace} yet — `ftkit train --watch` makes one,"
            f" or pass --model (e.g. --model {LOCAL_MODEL_ALIAS} for the untuned base)"
        )
    _check_served(settings, name)
    with open_model_endpoint(settings, name) as endpoint:
        answerer = OpenAIAnswerer.from_settings(endpoint, settings)
        try:
            text = answerer.answer([Turn("user", question)], on_text)
        finally:
            answerer.close()
    return Answer(name, text)


def _check_served(settings: Settings, name: str) -> None:
    """The embedded server answers only for the models it is started with: say so before it fails obscurely."""
    from finetune_kit.llm.endpoint import is_local_model
    from finetune_kit.llm.local_server import resolve_model_path, server_config

    local = settings.resolved_provider == "local" or is_local_model(settings, name)
    if not local or name == LOCAL_MODEL_ALIAS:
        return

    served = {
        entry["model_alias"] for entry in server_config(settings, resolve_model_path(settings))["models"]
    }
    if name not in served:
        raise ConfigError(
            f"model {name} is not served by the embedded server of {settings.workspace} — `ftkit models` lists"
            " the fine-tuned models (a local model trained on a checkpoint folder, not a GGUF, cannot be served)"
        )
