"""Slack credentials from the environment, and the Web API client they open."""

from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError

SLACK_CALL_TIMEOUT_S = 10
MANIFEST_HINT = "create the app from slack-app-manifest.yaml (README: Slack bot)"


@dataclass(frozen=True)
class SlackCredentials:
    """The bot token, and the signing secret (HTTP mode) or the app-level token (Socket Mode)."""

    bot_token: str
    signing_secret: str | None
    app_token: str | None


def slack_credentials(settings: Settings) -> SlackCredentials:
    """The Slack secrets from the environment, or a ConfigError naming the one missing and where to find it."""
    bot = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    app = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
    secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    if not bot:
        raise ConfigError(
            f"SLACK_BOT_TOKEN is not set — {MANIFEST_HINT}, install it and export its Bot User OAuth Token (xoxb-…)"
        )
    if not bot.startswith("xoxb-"):
        raise ConfigError("SLACK_BOT_TOKEN is not a bot token — export the Bot User OAuth Token (xoxb-…)")
    if app and not app.startswith("xapp-"):
        raise ConfigError(
            "SLACK_APP_TOKEN is not an app-level token — create one (xapp-…) with connections:write under Basic Information"
        )
    if not app and not secret:
        raise ConfigError(
            "SLACK_SIGNING_SECRET is not set — export the Signing Secret from the app's Basic Information page "
            "(HTTP mode), or SLACK_APP_TOKEN (xapp-…) for Socket Mode"
        )
    return SlackCredentials(bot, secret, app)


def slack_web_client(settings: Settings, token: str) -> WebClient:
    """A Web API client on SLACK_API_URL that waits out rate limits (Retry-After) and retries dropped connections."""
    retries = [ConnectionErrorRetryHandler(max_retry_count=2), RateLimitErrorRetryHandler(max_retry_count=3)]
    return WebClient(
        token=token, base_url=settings.slack_api_url, timeout=SLACK_CALL_TIMEOUT_S, retry_handlers=retries
    )
