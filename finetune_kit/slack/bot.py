"""`ftkit slack`: the support model answers in Slack threads. build_app() wires the bot; serve() runs it."""

import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from slack_bolt import App, BoltRequest, BoltResponse
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from finetune_kit.config import Settings
from finetune_kit.errors import AnswerFailed, ConfigError, VagueQueryError
from finetune_kit.slack.answerer import Answerer, DocsAnswerer, SourcedAnswer, open_answerer
from finetune_kit.slack.credentials import slack_credentials, slack_web_client
from finetune_kit.slack.preview import StreamPreview
from finetune_kit.slack.records import BotRecords, Question
from finetune_kit.slack.server import EventServer, connect_socket_mode
from finetune_kit.slack.text import escape, link, mentions, slack_to_plain, split_message, to_mrkdwn
from finetune_kit.slack.thread import ANSWERED_SUBTYPES, BotIdentity, conversation

log = logging.getLogger(__name__)

PLACEHOLDER = "_Thinking…_"
TIMEOUT_NOTE = "Sorry — the model took too long to answer. Please try again in a minute."
FAILURE_NOTE = "Sorry — I couldn't get an answer from the model. Please try again later."
CITES_NOTHING_NOTE = "_This answer cites no source from the docs — check it before relying on it._"
RATINGS = {"+1": 1, "thumbsup": 1, "-1": -1, "thumbsdown": -1}
HANDLED_EVENTS = ("app_mention", "message", "reaction_added", "reaction_removed")
EVENT_PRUNE_INTERVAL_S = 3600
RECENT_EVENTS = 10_000  # event ids kept in memory; Slack retries within the hour
LISTENER_THREADS = 16  # event handling and placeholders (network-bound); model calls have their own pool


@dataclass(frozen=True)
class Job:
    """One question to answer in the thread where its placeholder waits."""

    answer_id: int
    question: Question
    placeholder_ts: str
    received: float  # time.monotonic() when the event arrived


@dataclass(frozen=True)
class ReadyInfo:
    """What the running bot listens on and answers with."""

    mode: Literal["socket", "http"]
    url: str | None
    model: str
    from_docs: bool = False  # answers from the retrieved docs, with their sources


def build_app(
    settings: Settings,
    answerer: Answerer,
    web_client: WebClient | None = None,
    docs: DocsAnswerer | None = None,
) -> "SlackBot":
    """The bolt app with the bot's listeners; checks the token with auth.test (nothing is built at import).

    With `docs`, questions are answered from the retrieved docs, with links to the sources each answer cites.
    """
    credentials = slack_credentials(settings)
    client = web_client or slack_web_client(settings, credentials.bot_token)
    try:
        identity = client.auth_test()
    except SlackApiError as exc:
        raise ConfigError(
            f"Slack rejected SLACK_BOT_TOKEN ({exc.response.get('error')}) — reinstall the app and export its current "
            "Bot User OAuth Token"
        ) from exc
    except (SlackClientError, OSError) as exc:
        raise ConfigError(f"cannot reach Slack at {client.base_url} ({exc}) — check SLACK_API_URL") from exc
    listeners = ThreadPoolExecutor(LISTENER_THREADS, thread_name_prefix="ftkit-slack-events")
    app = App(
        name="ftkit",
        client=client,
        signing_secret=credentials.signing_secret or "",
        request_verification_enabled=credentials.app_token is None,  # Socket Mode has no HTTP request to sign
        token_verification_enabled=True,  # bolt's own auth.test, at start rather than on the first event
        process_before_response=False,
        listener_executor=listeners,
    )
    me = BotIdentity(user_id=identity["user_id"], bot_id=identity.get("bot_id") or "")
    return SlackBot(app, client, me, settings, answerer, BotRecords(settings.db_path), listeners, docs)


class SlackBot:
    """Answers mentions, DMs and thread follow-ups once each; records answers and 👍/👎 feedback."""

    def __init__(
        self,
        app: App,
        client: WebClient,
        identity: BotIdentity,
        settings: Settings,
        answerer: Answerer,
        records: BotRecords,
        listeners: ThreadPoolExecutor,
        docs: DocsAnswerer | None = None,
    ) -> None:
        self.app, self.client, self.identity = app, client, identity
        self.settings, self.answerer, self.records, self.docs = settings, answerer, records, docs
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._busy = 0  # events and answers under way
        self._recent_events: OrderedDict[str, None] = OrderedDict()
        self._events_pruned_at = -float(EVENT_PRUNE_INTERVAL_S)  # the first event prunes what past runs left
        self._idle = threading.Condition()
        self._listeners = listeners
        self._jobs = ThreadPoolExecutor(settings.slack.concurrency, thread_name_prefix="ftkit-slack-answers")
        app.use(self._skip_repeated_events)
        # With process_before_response off, bolt acks an event before it runs the listener on its executor: the
        # ack is immediate without lazy listeners, which exist for FaaS and deep-copy every request (8x the CPU).
        for event in ("app_mention", "message"):
            app.event(event)(self._on_message)
        app.event("reaction_added")(self._on_reaction_added)
        app.event("reaction_removed")(self._on_reaction_removed)

    def count(self, what: str) -> None:
        """Add one to a counter in `stats` (events, answered, failed, ignored, duplicates…)."""
        with self._stats_lock:
            self.stats[what] += 1

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every event received so far is handled and every answer written; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)

    def _begin(self) -> None:
        with self._idle:
            self._busy += 1

    def _end(self) -> None:
        with self._idle:
            self._busy -= 1
            if self._busy == 0:
                self._idle.notify_all()

    def _skip_repeated_events(
        self, body: dict[str, Any], request: BoltRequest, next: Callable[[], None]
    ) -> Any:
        """Ack a Slack retry of an event this process has seen at once, without handling it again.

        Kept in memory so the ack waits on no disk; the listener checks the state DB (a restart's retries).
        """
        event_type, event_id = (body.get("event") or {}).get("type", ""), body.get("event_id")
        if event_id:
            with self._stats_lock:
                repeated = event_id in self._recent_events
                self._recent_events[event_id] = None
                if len(self._recent_events) > RECENT_EVENTS:
                    self._recent_events.popitem(last=False)
            if repeated:
                retry = request.headers.get("x-slack-retry-num", ["-"])[0]
                log.info("skipping event %s seen before (retry %s)", event_id, retry)
                self.count("duplicate_events")
                return BoltResponse(status=200, body="")
        if event_type in HANDLED_EVENTS:
            self._begin()  # ended by the event's listener
        return next()

    @contextlib.contextmanager
    def _handling(self, body: dict[str, Any]) -> Iterator[bool]:
        """Yields False for an event the state DB has seen (a retry after a restart); counts it handled after."""
        try:
            event_id, event_type = body.get("event_id"), (body.get("event") or {}).get("type", "")
            first = not event_id or self.records.first_delivery(event_id, event_type)
            with self._stats_lock:
                prune, now = False, time.monotonic()
                if now - self._events_pruned_at > EVENT_PRUNE_INTERVAL_S:
                    prune, self._events_pruned_at = True, now
            if prune:
                self.records.forget_old_events()
            if not first:
                log.info("skipping event %s seen before a restart", event_id)
                self.count("duplicate_events")
            yield first
        finally:
            self.count("events")
            self._end()

    def _on_message(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        with self._handling(body) as first:
            question = self._question(event) if first else None
            if question is None:
                self.count("ignored" if first else "skipped")
            else:
                self._start(question, time.monotonic())

    def _question(self, event: dict[str, Any]) -> Question | None:
        """The question in a mention, DM or thread follow-up, or None when the bot should stay quiet."""
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not (user and channel and ts) or user == self.identity.user_id:
            return None
        if event.get("subtype") not in ANSWERED_SUBTYPES or event.get("bot_id"):
            return None  # edits, deletions, joins and other bots' messages
        direct = event.get("channel_type") == "im"
        if not self._answers_in(channel, direct):
            return None
        text, thread_ts = event.get("text") or "", event.get("thread_ts") or ts
        in_bot_thread = thread_ts != ts and self.records.answered_in_thread(channel, thread_ts)
        if not (direct or in_bot_thread or mentions(text, self.identity.user_id)):
            return None
        plain = slack_to_plain(text, self.identity.user_id)
        return Question(channel, ts, thread_ts, user, plain) if plain or thread_ts != ts else None

    def _answers_in(self, channel: str, direct: bool) -> bool:
        """DMs unless turned off; channels on the allow-list, or all of them when it is empty."""
        if direct:
            return self.settings.slack.answer_dms
        allowed = self.settings.slack.allowed_channels
        return not allowed or channel in allowed

    def _start(self, question: Question, received: float) -> None:
        """Claim the message (a mention also arrives as a message event), post the placeholder, queue the answer."""
        answer_id = self.records.claim(question)
        if answer_id is None:
            self.count("duplicate_messages")
        else:
            self._post_placeholder(answer_id, question, received)

    def _post_placeholder(self, answer_id: int, question: Question, received: float) -> None:
        try:
            placeholder = self.client.chat_postMessage(
                channel=question.channel, thread_ts=question.thread_ts, text=PLACEHOLDER
            )
        except SlackApiError as exc:  # e.g. not_in_channel: nowhere to say anything
            log.warning("cannot post in %s (%s)", question.channel, exc.response.get("error"))
            self._finish(Job(answer_id, question, "", received), "failed", None, _short(exc), [])
            return
        self.records.set_placeholder(answer_id, placeholder["ts"])
        self._queue(Job(answer_id, question, placeholder["ts"], received))

    def resume_pending(self) -> int:
        """Answer the questions a stopped bot left unanswered (their placeholders still say Thinking…)."""
        pending = self.records.pending()
        for item in pending:
            if item.placeholder_ts is None:
                self._post_placeholder(item.id, item.question, time.monotonic())
            else:
                self._queue(Job(item.id, item.question, item.placeholder_ts, time.monotonic()))
        return len(pending)

    def _queue(self, job: Job) -> None:
        self._begin()
        self._jobs.submit(self._answer, job)

    def _answer(self, job: Job) -> None:
        """Ask the model with the thread as context, then put the answer where the placeholder was."""
        question = job.question
        try:
            not_answers = self.records.not_answers(question.channel, question.thread_ts)
            turns = conversation(self.client, question, self.identity, not_answers)
            preview = None
            if self.settings.slack.stream:
                preview = StreamPreview(
                    self.client, question.channel, job.placeholder_ts, self.settings.slack.update_interval_s
                )
            if self.docs is None:
                text = self.answerer.answer(turns, preview)
                self._finish(job, "answered", text, None, self._post_answer(job, to_mrkdwn(text)))
            else:
                grounded = self.docs.answer_from_docs(question.text, turns[:-1], preview)
                replies = self._post_answer(job, grounded_mrkdwn(grounded))
                self._finish(job, "answered", grounded.answer, None, replies, grounded)
        except VagueQueryError as exc:  # nothing to search for: say so, as an answer (it can be rated)
            self._finish(job, "answered", str(exc), None, self._post_answer(job, escape(str(exc))))
        except AnswerFailed as exc:
            log.warning("no answer for %s/%s: %s", question.channel, question.ts, exc.reason)
            note = TIMEOUT_NOTE if exc.timed_out else FAILURE_NOTE
            self._finish(job, "failed", None, exc.reason, self._note(job, note))
        # A Slack outage or a bug: a short note in the thread, the traceback in the log.
        except Exception as exc:
            log.exception("answering %s/%s failed", question.channel, question.ts)
            self._finish(job, "failed", None, _short(exc), self._note(job, FAILURE_NOTE))
        finally:
            self._end()

    def _post_answer(self, job: Job, mrkdwn: str) -> list[str]:
        """The answer in the placeholder, continued in more replies when it is longer than one message."""
        first, *rest = split_message(mrkdwn)
        channel = job.question.channel
        self.client.chat_update(channel=channel, ts=job.placeholder_ts, text=first)
        replies = [job.placeholder_ts]
        for part in rest:
            reply = self.client.chat_postMessage(
                channel=channel, thread_ts=job.question.thread_ts, text=part, unfurl_links=False
            )
            replies.append(reply["ts"])
        return replies

    def _note(self, job: Job, note: str) -> list[str]:
        """Replace the placeholder with a short note; the message is not an answer, so no reply ids."""
        try:
            self.client.chat_update(channel=job.question.channel, ts=job.placeholder_ts, text=note)
        except SlackApiError as exc:
            log.warning("cannot update %s (%s)", job.placeholder_ts, exc.response.get("error"))
        return []

    def _finish(
        self,
        job: Job,
        status: Literal["answered", "failed"],
        text: str | None,
        error: str | None,
        replies: list[str],
        grounded: SourcedAnswer | None = None,
    ) -> None:
        latency_ms = _ms_since(job.received)
        self.records.finish(
            job.answer_id,
            status,
            text=text,
            error=error,
            model=self.answerer.model,
            latency_ms=latency_ms,
            reply_ts=replies,
            channel=job.question.channel,
            grounded=grounded,
        )
        self.count(status)
        log.info("%s %s/%s in %d ms", status, job.question.channel, job.question.ts, latency_ms)

    def _on_reaction_added(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        with self._handling(body) as first:
            if first:
                self._on_reaction(event, added=True)

    def _on_reaction_removed(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        with self._handling(body) as first:
            if first:
                self._on_reaction(event, added=False)

    def _on_reaction(self, event: dict[str, Any], added: bool) -> None:
        """A 👍 or 👎 on one of the bot's answers is feedback: tomorrow's training data."""
        item, user = event.get("item") or {}, event.get("user") or ""
        reaction = (event.get("reaction") or "").split("::")[0]  # "+1::skin-tone-3" is a +1
        rating = RATINGS.get(reaction)
        if rating is None or item.get("type") != "message" or user in ("", self.identity.user_id):
            return
        channel, ts = item.get("channel", ""), item.get("ts", "")
        if added:
            recorded = self.records.add_feedback(channel, ts, user, reaction, rating)
        else:
            recorded = self.records.remove_feedback(channel, ts, user, reaction)
        if recorded:
            self.count("feedback" if added else "feedback_removed")

    def close(self) -> None:
        """Finish the answers being written; queued ones stay pending and are resumed at the next start."""
        self._listeners.shutdown(wait=True)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self.records.close()


def serve(
    settings: Settings,
    on_ready: Callable[[ReadyInfo], None],
    open_docs: Callable[[Answerer], contextlib.AbstractContextManager[DocsAnswerer]] | None = None,
) -> None:
    """Run the bot until interrupted: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on slack_host:slack_port.

    `open_docs` (retrieval.answer.grounded_answerer) makes it answer from the docs.
    """
    credentials = slack_credentials(settings)  # fail before starting a model server
    with open_answerer(settings) as answerer, contextlib.ExitStack() as opened:
        docs = opened.enter_context(open_docs(answerer)) if open_docs else None
        bot = build_app(settings, answerer, docs=docs)
        try:
            if resumed := bot.resume_pending():
                log.info("resuming %d unanswered questions", resumed)
            if credentials.app_token:
                handler = connect_socket_mode(bot.app, credentials.app_token)
                on_ready(ReadyInfo("socket", None, answerer.model, docs is not None))
                try:
                    threading.Event().wait()
                finally:
                    handler.close()
            else:
                server = _listen(bot.app, settings.slack.host, settings.slack.port)
                on_ready(ReadyInfo("http", server.url, answerer.model, docs is not None))
                try:
                    server.serve_forever()
                finally:
                    server.server_close()
        finally:
            bot.close()


def grounded_mrkdwn(answer: SourcedAnswer) -> str:
    """An answer from the docs in mrkdwn: the text, then a link to each source it cites (or a note that none)."""
    body = to_mrkdwn(answer.answer)
    if answer.refused:
        return body
    if not answer.sources:
        return f"{body}\n\n{CITES_NOTHING_NOTE}"
    lines = [
        f"[{source.n}] {link(source.url, source.title)}"
        + (f" — {escape(source.heading)}" if source.heading and source.heading != source.title else "")
        for source in answer.sources
    ]
    return body + "\n\n*Sources*\n" + "\n".join(lines)


def _listen(app: App, host: str, port: int) -> EventServer:
    try:
        return EventServer(app, host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}) — pick another --port or --host"
        ) from exc


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def _short(exc: Exception) -> str:
    """One line about an unexpected failure, for the state DB."""
    if isinstance(exc, SlackApiError):
        return f"slack: {exc.response.get('error')}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
