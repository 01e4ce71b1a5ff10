"""The embedding provider interface and the shared ``embed`` skeleton behind every backend.

A provider turns a batch of texts into vectors. It never touches the database: the worker
hands it texts and gets back an ``EmbedResult`` aligned with its inputs, where each input has
either a vector or a permanent error message. Whole-call failures are exceptions from
``queue_processor.errors``: ``ProviderUnavailable`` (retry the batch later) or
``ConfigurationError`` (stop the worker).

``EmbeddingProvider`` is the interface (decorators such as a cache implement it directly).
``BatchingProvider`` is the skeleton the real backends share, after pgai's ``BatchApiCaller``:
it de-duplicates, rejects what no backend can take, packs requests by count and token budget,
fans them out, validates every vector and assembles the aligned result; a subclass only
embeds one packed request (and may load or close something). The pure steps (dedupe,
packing, vector checks) live in ``packing``.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import ClassVar, Self

import anyio
import anyio.to_thread
import structlog

from queue_processor.errors import ConfigurationError, ProviderUnavailable
from queue_processor.providers.packing import (
    Vector,
    dedupe,
    pack_requests,
    require,
    validate_vector,
)
from queue_processor.providers.tokens import ContextLimit, EstimateTokenizer, Tokenizer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """What one ``embed()`` call produced, aligned with its inputs.

    ``vectors[i]`` is the (read-only, possibly shared between identical inputs) vector of
    input ``i`` or None; for every None there is an entry
    ``errors[i]`` with a permanent, human-readable reason (never containing secrets).
    ``tokens`` is the usage the server reported (estimated where it reported none) and
    ``requests`` counts HTTP requests made, including retries and split requests;
    ``cached`` counts inputs served from a cache instead of the backend.
    ``too_long[i]`` (a subset of ``errors``) says that the server refused input ``i`` for
    its length and how many tokens (in the provider's ``tokenizer``) it must be cut to.
    """

    vectors: list[Vector | None]
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    requests: int = 0
    cached: int = 0
    too_long: dict[int, int] = field(default_factory=dict)


class EmbeddingProvider(abc.ABC):
    """An async embedding backend; use it as an async context manager.

    Attributes describe the backend for the worker: ``name`` (e.g. "openai"), ``model``,
    ``dimensions`` (the expected output dimension, None if unknown until the first vector),
    and the per-request limits the provider packs batches into.
    ``max_input_tokens`` is the model's input limit (None: unknown), counted in
    ``tokenizer``; it goes down when a server reports a smaller one (see ``too_long``).
    """

    name: str
    model: str
    dimensions: int | None
    max_inputs_per_request: int
    max_tokens_per_request: int
    max_input_tokens: int | None = None
    tokenizer: Tokenizer = EstimateTokenizer()

    async def prepare(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Make ``tokenizer`` and ``max_input_tokens`` final (e.g. load a local model)."""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts``; per-input problems go to ``EmbedResult.errors``.

        Raises ``ProviderUnavailable`` when the backend fails transiently after in-call
        retries, and ``ConfigurationError`` when no call can succeed until settings change.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources (HTTP clients, models). Safe to call more than once."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(slots=True)
class Usage:
    """What one ``embed()`` call has spent so far; subclasses add to it as they work.

    ``tokens``: as reported by the backend, or estimated; ``requests``: backend requests
    made, retries and split requests included.
    """

    tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What one packed request produced, aligned with its texts.

    ``vectors[i]`` is the raw vector of text ``i`` (validated by the skeleton) or None, and
    then ``errors[i]`` says why (a permanent, secret-free reason).
    """

    vectors: list[Vector | None]
    errors: dict[int, str] = field(default_factory=dict)
    # Texts the server refused for their length, with what it said (a subset of errors).
    context_limits: dict[int, ContextLimit] = field(default_factory=dict)

    def __add__(self, other: RequestResult) -> RequestResult:
        """This result followed by ``other``: the result of the two requests' texts in order."""
        shift = len(self.vectors)
        errors = self.errors | {offset + shift: error for offset, error in other.errors.items()}
        limits = self.context_limits | {
            offset + shift: limit for offset, limit in other.context_limits.items()
        }
        return RequestResult(
            vectors=self.vectors + other.vectors, errors=errors, context_limits=limits
        )


class BatchingProvider(EmbeddingProvider):
    """The shared ``embed`` skeleton; a subclass implements ``_embed_request`` and ``is_closed``.

    One ``embed()`` call: refuses to run once closed (RuntimeError); returns at once for no
    texts; runs ``_prepare()`` (e.g. load a model); collapses identical texts; fails each
    text that is not valid Unicode; packs the rest into requests of at most
    ``max_inputs_per_request`` texts and ``max_tokens_per_request`` estimated tokens; runs
    them; validates every vector (shape, dimension, finite values; with no configured
    dimension, the call's majority dimension wins); and fans the results back out to every
    input position, tokens and requests summed.

    Requests run concurrently when ``concurrent_requests`` is true (the subclass bounds them
    with its own limiter, shared by all calls of the provider), else one by one in order.
    The first ``ConfigurationError`` or ``ProviderUnavailable`` cancels the call's other
    requests and is raised, a configuration error before an outage.
    """

    concurrent_requests: ClassVar[bool] = True

    def __init__(
        self,
        model: str,
        *,
        dimensions: int | None,
        max_inputs_per_request: int,
        max_tokens_per_request: int,
        max_input_tokens: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Check and set what every backend has (ConfigurationError for a bad value)."""
        require(bool(model.strip()), f"the {self.name} embedding model name is empty")
        require(max_inputs_per_request >= 1, "max_inputs_per_request must be at least 1")
        require(max_tokens_per_request >= 1, "max_tokens_per_request must be at least 1")
        require(
            max_input_tokens is None or max_input_tokens >= 1,
            "max_input_tokens must be at least 1",
        )
        self.model = model
        self.dimensions = dimensions
        self.max_inputs_per_request = max_inputs_per_request
        self.max_tokens_per_request = max_tokens_per_request
        self.max_input_tokens = max_input_tokens
        self.tokenizer = tokenizer or EstimateTokenizer()

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once ``aclose()`` has released the backend; ``embed()`` then refuses work."""

    async def _prepare(self) -> None:
        """Make the backend ready before a non-empty call (e.g. load a model)."""

    async def prepare(self) -> None:
        """Make the backend ready now (``_prepare``): its tokenizer and limit are final."""
        if self.is_closed:
            raise RuntimeError(f"the {self.name} provider is closed")
        await self._prepare()

    def learn_input_limit(self, text: str, said: ContextLimit) -> int | None:
        """A server refused ``text`` saying its limit is ``said.limit`` tokens: return how many
        of our tokens the text must be cut to (None when cutting could not help), and lower
        ``max_input_tokens`` to it for the rest of the run.

        The server's count and ours may differ (an estimate, a BOS token): the cut scales our
        count by limit/requested, taking our count as the server's when it named none.
        """
        ours = self.tokenizer.count(text)
        requested = said.requested or ours
        fit = ours * said.limit // requested if requested > 0 else 0
        if fit >= ours or fit < 1:
            return None
        if self.max_input_tokens is None or fit < self.max_input_tokens:
            log.warning(
                "input_limit_learned",
                model=self.model,
                server_limit=said.limit,
                max_input_tokens=fit,
                previous=self.max_input_tokens,
            )
            self.max_input_tokens = fit
        return fit

    @abc.abstractmethod
    async def _embed_request(self, texts: list[str], usage: Usage) -> RequestResult:
        """Embed one packed request's ``texts`` (distinct, valid Unicode, within the limits).

        Add the requests made and tokens spent to ``usage``. Raise ``ProviderUnavailable``
        or ``ConfigurationError`` for a failure of the whole request.
        """

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts``: vectors aligned with the inputs, per-input errors, usage."""
        if self.is_closed:
            raise RuntimeError(f"the {self.name} provider is closed")
        if not texts:
            return EmbedResult(vectors=[])
        await self._prepare()
        unique, index_map = dedupe(texts)
        call = _Call(unique)
        sendable = call.encodable_positions()
        # Counting tokens of long texts takes a while: off the event loop.
        groups = await anyio.to_thread.run_sync(
            partial(
                pack_requests,
                [unique[i] for i in sendable],
                self.max_inputs_per_request,
                self.max_tokens_per_request,
                count=self.tokenizer.count,
            )
        )
        await self._run_requests(call, [[sendable[i] for i in group] for group in groups])
        if self.dimensions is None:
            call.keep_majority_dimension()
        return call.result(index_map)

    async def _run_requests(self, call: _Call, requests: list[list[int]]) -> None:
        """Run every request (lists of positions in ``call.unique``); see the class docstring."""
        if not self.concurrent_requests:
            for positions in requests:
                await self._run_request(call, positions)
            return
        failures: list[Exception] = []

        async def run(positions: list[int], scope: anyio.CancelScope) -> None:
            try:
                await self._run_request(call, positions)
            except (ConfigurationError, ProviderUnavailable) as exc:
                failures.append(exc)
                scope.cancel()

        async with anyio.create_task_group() as tg:
            for positions in requests:
                tg.start_soon(run, positions, tg.cancel_scope)
        if failures:
            # A configuration problem outranks an outage: it needs an operator either way.
            failures.sort(key=lambda exc: not isinstance(exc, ConfigurationError))
            raise failures[0]

    async def _run_request(self, call: _Call, positions: list[int]) -> None:
        """Embed one request and record each validated vector, read-only, or its error."""
        result = await self._embed_request([call.unique[p] for p in positions], call.usage)
        for offset, position in enumerate(positions):
            vector = result.vectors[offset]
            if vector is None:
                call.errors[position] = result.errors.get(offset, "provider returned no vector")
                said = result.context_limits.get(offset)
                fit = None if said is None else self.learn_input_limit(call.unique[position], said)
                if fit is not None:
                    call.too_long[position] = fit
                continue
            problem = validate_vector(vector, self.dimensions)
            if problem is not None:
                call.errors[position] = problem
                continue
            vector.setflags(write=False)  # may be shared by identical inputs of the call
            call.vectors[position] = vector


@dataclass
class _Call:
    """Everything one ``embed()`` call accumulates, keyed by position in ``unique``."""

    unique: list[str]
    vectors: dict[int, Vector] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    too_long: dict[int, int] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)

    def encodable_positions(self) -> list[int]:
        """Positions of the texts that are valid Unicode; the others get their error now."""
        sendable: list[int] = []
        for position, text in enumerate(self.unique):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                self.errors[position] = "input is not valid Unicode (it contains a lone surrogate)"
            else:
                sendable.append(position)
        return sendable

    def keep_majority_dimension(self) -> None:
        """Without a configured dimension, vectors off the call's majority dimension fail."""
        if not self.vectors:
            return
        counts = Counter(int(vector.shape[0]) for vector in self.vectors.values())
        if len(counts) == 1:
            return
        expected = counts.most_common(1)[0][0]
        for position, vector in list(self.vectors.items()):
            if vector.shape[0] != expected:
                del self.vectors[position]
                self.errors[position] = (
                    f"provider returned {vector.shape[0]} dimensions, expected {expected}"
                )

    def result(self, index_map: list[int]) -> EmbedResult:
        """The call's result for the original inputs (``index_map`` from ``dedupe``)."""
        vectors: list[Vector | None] = []
        errors: dict[int, str] = {}
        too_long: dict[int, int] = {}
        for index, position in enumerate(index_map):
            vector = self.vectors.get(position)
            vectors.append(vector)
            if vector is None:
                errors[index] = self.errors.get(position, "provider returned no vector")
                if position in self.too_long:
                    too_long[index] = self.too_long[position]
        if errors:
            log.warning("provider_input_errors", inputs=len(index_map), failed=len(errors))
        return EmbedResult(
            vectors=vectors,
            errors=errors,
            tokens=self.usage.tokens,
            requests=self.usage.requests,
            too_long=too_long,
        )
