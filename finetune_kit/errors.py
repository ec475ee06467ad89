"""The FtkitError tree: every error a user can fix, each message naming the fix."""


class FtkitError(Exception):
    """Base of every error ftkit reports as one line and exit code 1."""


class ConfigError(FtkitError):
    """A setting, flag or config file is invalid."""


class ExtraMissingError(FtkitError):
    """A command needs an optional part of ftkit (an extra) that is not installed."""


class SourceError(FtkitError):
    """A corpus source is missing, empty or unreadable."""


class AirtableError(SourceError):
    """Airtable refused a request, or an Airtable setting is wrong."""


class NestingTooDeep(SourceError):
    """A document nests deeper than its converter can walk safely."""


class ChunkingError(FtkitError):
    """Chunking settings are inconsistent."""


class StoreError(FtkitError):
    """The state database cannot be opened or is from a newer ftkit."""


class LLMError(FtkitError):
    """The LLM endpoint failed in a way retries cannot fix."""


class EndpointUnreachableError(LLMError):
    """The LLM endpoint cannot be reached."""


class AuthenticationError(LLMError):
    """The LLM endpoint rejected the API key."""


class PermissionDeniedError(LLMError):
    """The endpoint refused this key the action asked for (HTTP 403)."""


class ResourceNotFoundError(LLMError):
    """The endpoint does not know the model, file, batch or job asked for (HTTP 404)."""


class RequestRejectedError(LLMError):
    """The endpoint refused one request as invalid (HTTP 400/422): that item fails, the stage goes on."""


class BudgetExceededError(LLMError):
    """The next call could take the run past --max-cost."""


class BatchFailedError(LLMError):
    """An OpenAI batch ended failed, expired or cancelled, or is unknown to the server."""


class LocalServerError(LLMError):
    """The embedded llama.cpp server could not be started."""


class DiskFullError(FtkitError):
    """A disk (or its quota) is full: the message names the path and the space needed or free."""


class TrainingError(FtkitError):
    """A fine-tuning job cannot be started, found, followed or cancelled."""


class JobFailedError(TrainingError):
    """A fine-tuning job ended failed or cancelled."""


class AnswerFailed(FtkitError):
    """The model gave no answer; `reason` is one short line, safe to store."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class RetrievalIndexError(FtkitError):
    """The retrieval index is missing, stale or was built with another embedding model."""


class VagueQueryError(FtkitError):
    """A search query with nothing to search for (empty, or only stop words)."""
