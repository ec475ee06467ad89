"""The grounding check: an answer is kept only if its chunk supports it.

Two gates, each switchable: a deterministic pre-check (the answer's commands, options, numbers, URLs and code
identifiers must appear in the chunk), then a judge call that sees the chunk and the answer and says supported,
partly or unsupported. Unsupported answers are rejected with the judge's claim; partly supported ones are asked
again once, with the claim named; a judge that never gives a verdict leaves the answer kept as "unchecked".
"""

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient, cached_result, request_hash
from finetune_kit.prompts import load_prompt
from finetune_kit.stages import Prefill

JUDGE_ATTEMPTS = 2  # judge calls per answer while its output holds no verdict (one retry)
JUDGE_STAGE = "grounding-judge"
JUDGE_MAX_TOKENS = 80  # a verdict line and one claim
JUDGE_RETRY_TEMPERATURE = 0.7
SEPARATOR = " — "  # between a reason's category (what `ftkit status` counts) and its detail
PRECHECK = "grounding pre-check: not in the chunk"
UNSUPPORTED = "grounding judge: unsupported"
PARTLY = "grounding judge: partly supported, also after a re-ask"
UNCHECKED = "grounding judge: unchecked"  # kept in the dataset: the reason says it was never checked
# SQL: a grounding reason counted by its category, any other reason as it is (`a` is the answers row)
DETAILED = ("grounding ", "near duplicate ")  # the reasons that carry a detail after SEPARATOR
REASON_CATEGORY = (
    "CASE WHEN (a.reason LIKE 'grounding %' OR a.reason LIKE 'near duplicate %') AND instr(a.reason, ' — ') > 0"
    " THEN substr(a.reason, 1, instr(a.reason, ' — ') - 1) ELSE a.reason END"
)

Verdict = Literal["supported", "partly", "unsupported"]
Screen = Callable[[str, str], str | None]  # (text, finish_reason) -> why it cannot be a training target

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)
_INLINE = re.compile(r"`([^`\n]{1,80})`")
_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
_URL = re.compile(r"https?://[^\s)>\]\"'`]+")
_IDENTIFIER = re.compile(
    r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\b"  # snake_case, UPPER_SNAKE
    r"|\b[a-z]+(?:[A-Z][a-z0-9]*)+\b"  # camelCase
    r"|\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b"  # CamelCase
    r"|\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?=\()"  # a dotted call: client.flags.get(
)
_UNIT = r"%|ms|s|sec|secs|seconds?|minutes?|mins?|hours?|h|days?|[kmgt]i?b|bytes?|requests?|tokens?|rps|x"
_NUMBER = re.compile(rf"(?<![\w.,])(\d+(?:[.,]\d+)*)(\s?(?:{_UNIT})\b|%)?", re.I)
_TOKEN = re.compile(r"-{0,2}\w[\w.-]*\w|\w")
_LIST_MARKER = re.compile(r"^\s*\d+[.)]\s", re.M)
_VERDICT = re.compile(r"verdict[\s:*\"'=-]*([^\n\"]*)", re.I)
_VERDICT_WORD = re.compile(
    r"\b(?:(not |un-?)supported|(part(?:ly|ial|ially))(?: supported)?|(supported))\b", re.I
)
_CLAIM = re.compile(r"unsupported claim[\s:*\"'=-]*(.+)", re.I)
_NO_CLAIM = {"", "none", "n/a", "na", "-", "nothing", "none."}


@dataclass
class Judgement:
    """What the judge said about one answer, or None as its verdict when it never said."""

    verdict: Verdict | None
    claim: str = ""


def grounding_key(settings: Settings) -> list[object]:
    """What the grounding check adds to an answer's key: switching a gate re-checks only under the new key."""
    judge = load_prompt("grounding_judge", settings.prompts_dir) if settings.grounding_judge else None
    reask = load_prompt("grounding_reask", settings.prompts_dir) if settings.grounding_judge else None
    return [
        settings.grounding_precheck,
        judge.version if judge else None,
        reask.version if reask else None,
    ]


def grounding_line(settings: Settings) -> str:
    """Which gates the settings turn on, for `ftkit status` (their counts are in its answers row)."""
    gates = {"pre-check": settings.grounding_precheck, "judge": settings.grounding_judge}
    return ", ".join(f"{name} {'on' if on else 'off'}" for name, on in gates.items())


def answer_status(reason: str | None) -> Literal["accepted", "rejected"]:
    """An answer with no reason, or only never checked, is kept."""
    return "accepted" if reason is None or reason.startswith(UNCHECKED) else "rejected"


def reason_category(reason: str) -> str:
    """What a run summary counts a reject as: a grounding reason without its detail, any other as it is."""
    return reason.split(SEPARATOR, 1)[0] if reason.startswith(DETAILED) else reason


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\\", "")).strip().lower()


def _numbers(text: str) -> set[str]:
    return {match.group(1).replace(",", "") for match in _NUMBER.finditer(text)}


def specifics(answer: str) -> list[str]:
    """The commands, options, URLs, identifiers and numbers an answer names, in order, each once."""
    found: list[str] = []
    prose = _FENCE.sub(" ", answer)
    for block in _FENCE.findall(answer):
        found += [line for line in (_command_line(raw) for raw in block.splitlines()) if line]
    found += [span.strip() for span in _INLINE.findall(prose) if span.strip()]
    prose = _INLINE.sub(" ", _LIST_MARKER.sub(" ", prose))
    found += [url.rstrip(".,;:!?") for url in _URL.findall(prose)]
    for pattern in (_FLAG, _IDENTIFIER):
        found += pattern.findall(prose)
    found += [
        m.group(0).strip()
        for m in _NUMBER.finditer(prose)
        if len(m.group(1)) > 1 or m.group(2)  # a bare digit is usually the answer's own count of steps
    ]
    return list(dict.fromkeys(found))


def _command_line(raw: str) -> str:
    """A code-block line without its shell prompt or trailing comment; empty for one of only punctuation."""
    line = re.sub(r"^\s*(?:\$|>|#\s*$)\s*", "", raw)
    line = re.sub(r"\s+#\s.*$", "", line).strip()
    return line if re.search(r"\w{2,}", line) else ""


def missing_specifics(answer: str, chunk: str, also_given: list[str]) -> list[str]:
    """The answer's specifics that neither the chunk nor the other given text (question, product) holds."""
    given = _normal(" ".join([chunk, *also_given]))
    given_numbers = _numbers(" ".join([chunk, *also_given]))
    missing = []
    for item in specifics(answer):
        if number := _NUMBER.fullmatch(item):
            present = number.group(1).replace(",", "") in given_numbers
        else:  # verbatim, or a command or call the answer wrote out of names and values the chunk all has
            present = _normal(item) in given or all(token in given for token in _tokens(item))
        if not present:
            missing.append(item)
    return missing


def _tokens(item: str) -> list[str]:
    """The names, options and values in a command or code span, of two characters or more."""
    return [token for token in _TOKEN.findall(_normal(item)) if len(token.strip("-.")) > 1]


def judge_request(settings: Settings, chunk: str, question: str, answer: str, attempt: int) -> ChatRequest:
    """The judge call that says whether `chunk` supports `answer`."""
    template = load_prompt("grounding_judge", settings.prompts_dir)
    prompt = template.render(product=settings.product, chunk=chunk, question=question, answer=answer)
    return ChatRequest(
        stage=JUDGE_STAGE,
        messages=(("user", prompt),),
        temperature=0.0 if attempt == 0 else JUDGE_RETRY_TEMPERATURE,  # greedy would repeat the same reply
        max_tokens=JUDGE_MAX_TOKENS,
        template_version=template.version,
        attempt=attempt,
    )


def parse_judgement(text: str) -> Judgement:
    """The verdict and claim in a judge's reply (a `Verdict:` line, JSON, or a bare first word)."""
    data = _json_object(text) or {}
    if isinstance(said := data.get("verdict"), str):
        verdict = _verdict(said)
    elif match := _VERDICT.search(text):
        verdict = _verdict(match.group(1))
    else:
        verdict = _verdict(text.strip().split("\n", 1)[0][:40])
    claim_match = _CLAIM.search(text)
    claim = (
        claim_match.group(1) if claim_match else str(data.get("claim") or data.get("unsupported_claim") or "")
    )
    claim = claim.strip().strip("\"'*")
    return Judgement(verdict, "" if claim.lower() in _NO_CLAIM else claim[:300])


def _verdict(words: str) -> Verdict | None:
    """The one verdict a phrase names; None for none, or for several (an echo of the instructions)."""
    found: set[Verdict] = set()
    for negated, part, _plain in _VERDICT_WORD.findall(words):
        found.add("unsupported" if negated else "partly" if part else "supported")
    return found.pop() if len(found) == 1 else None


def _json_object(text: str) -> dict[str, object] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def reask_request(settings: Settings, request: ChatRequest, answer: str, claim: str) -> ChatRequest:
    """The answer request asked again, with the answer and the claim the judge found unsupported."""
    template = load_prompt("grounding_reask", settings.prompts_dir)
    follow_up = template.render(claim=claim or "(the judge named no claim)")
    return ChatRequest(
        stage=request.stage,
        messages=(*request.messages, ("assistant", answer), ("user", follow_up)),
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        template_version=f"{request.template_version}+{template.version}",
        attempt=request.attempt + 1,
    )


async def judge(client: LLMClient, settings: Settings, chunk: str, question: str, answer: str) -> Judgement:
    """Ask the judge up to JUDGE_ATTEMPTS times until its reply holds a verdict."""
    for attempt in range(JUDGE_ATTEMPTS):
        try:
            result = await client.chat(judge_request(settings, chunk, question, answer, attempt))
        except RequestRejectedError:
            break  # the endpoint refuses to judge this answer; asking again would be refused too
        judgement = parse_judgement(result.content)
        if judgement.verdict is not None:
            return judgement
    return Judgement(None)


@dataclass
class GroundingCheck:
    """Checks answers of one run against their chunks and counts what each gate did."""

    client: LLMClient
    settings: Settings
    screen: Screen  # the answer filters a re-asked answer passes too
    counts: Counter[str]

    async def check(
        self, request: ChatRequest, chunk: str, question: str, answer: str
    ) -> tuple[str, str | None]:
        """The answer to keep (the first, or its re-ask) and why it cannot be kept as checked, if so."""
        for reasked in (False, True):
            if reason := self._precheck(answer, chunk, question):
                return answer, reason
            if not self.settings.grounding_judge:
                return answer, None
            found = await judge(self.client, self.settings, chunk, question, answer)
            if found.verdict != "partly" or reasked:
                return answer, self._outcome(found, reasked)
            self.counts["judge: partly (asked again)"] += 1
            answer, reason = await self._reask(request, answer, found.claim)
            if reason:
                return answer, reason
        raise AssertionError("unreachable")  # the loop returns on its second pass

    async def prefill_judges(
        self, prefill: Prefill, asked: list[tuple[ChatRequest, str, str]], failed: dict[str, str]
    ) -> None:
        """Fetch the first judge call of every answer `prefill` brought (request, chunk, question) the same way."""
        if not self.settings.grounding_judge:
            return
        judges = []
        for request, chunk, question in asked:
            key = request_hash(self.client.endpoint, request)
            answer = None if key in failed else cached_result(self.client.store, key)
            if answer is None or self.screen(answer.content, answer.finish_reason):
                continue
            text = answer.content.strip()
            if not (
                self.settings.grounding_precheck
                and missing_specifics(text, chunk, [question, self.settings.product])
            ):
                judges.append(judge_request(self.settings, chunk, question, text, 0))
        if judges:
            await prefill(judges)  # a judge call the batch could not make is made live

    def _precheck(self, answer: str, chunk: str, question: str) -> str | None:
        if not self.settings.grounding_precheck:
            return None
        missing = missing_specifics(answer, chunk, [question, self.settings.product])
        if not missing:
            return None
        self.counts["pre-check: rejected"] += 1
        return PRECHECK + SEPARATOR + ", ".join(missing[:5])

    def _outcome(self, found: Judgement, reasked: bool) -> str | None:
        if found.verdict is None:
            self.counts["judge: unchecked (no verdict)"] += 1
            return f"{UNCHECKED}{SEPARATOR}no verdict in {JUDGE_ATTEMPTS} replies; kept without a check"
        if found.verdict == "supported":
            self.counts["judge: supported" + " after a re-ask" * reasked] += 1
            return None
        self.counts[f"judge: {found.verdict}" + " after a re-ask" * reasked] += 1
        category = PARTLY if found.verdict == "partly" else UNSUPPORTED
        return category + SEPARATOR + (found.claim or "the judge named no claim")

    async def _reask(self, request: ChatRequest, answer: str, claim: str) -> tuple[str, str | None]:
        try:
            result = await self.client.chat(reask_request(self.settings, request, answer, claim))
        except RequestRejectedError as exc:
            return answer, f"request rejected by the endpoint: {exc}"
        text = result.content.strip()
        return text, self.screen(result.content, result.finish_reason)
