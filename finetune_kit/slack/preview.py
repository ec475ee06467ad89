"""A streaming answer shown in its placeholder while the model writes it."""

import logging
import time
from collections.abc import Callable

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from finetune_kit.slack.text import split_message, to_mrkdwn

log = logging.getLogger(__name__)


class StreamPreview:
    """Shows a streaming answer in its placeholder, at most one chat.update per `interval_s`."""

    def __init__(
        self,
        client: WebClient,
        channel: str,
        ts: str,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.channel, self.ts = client, channel, ts
        self.interval_s, self.clock = interval_s, clock
        self.last = clock()
        self.updates = 0

    def __call__(self, text: str) -> None:
        now = self.clock()
        if now - self.last < self.interval_s:
            return
        self.last = now
        try:
            self.client.chat_update(
                channel=self.channel, ts=self.ts, text=split_message(to_mrkdwn(text))[0] + " …"
            )
            self.updates += 1
        except SlackApiError as exc:  # a missed preview is harmless: the final update carries the answer
            log.warning("preview update failed (%s)", exc.response.get("error"))
