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
    with open_model_endpoint(settings, name) as endpoint:
        answerer = OpenAIAnswerer.from_settings(endpoint, settings)
        try:
            text = answerer.answer([Turn("user", question)], on_text)
        finally:
            answerer.close()
    return Answer(name, text)
