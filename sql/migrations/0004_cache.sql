-- 0004_cache: an opt-in embedding cache (EMBEDDING_CACHE=true), so the same text is never
-- paid for twice: a --force re-embed of unchanged rows, or a requeue after an outage, is
-- served from here without a provider call. Keyed by model, requested dimensions (0 = the
-- model's default) and the SHA-256 of the exact content. Vectors are stored as little-endian
-- float32 bytes: compact, needs no pgvector, and loads without parsing floats.
CREATE TABLE embedding_cache (
    model        text    NOT NULL,
    dimensions   integer NOT NULL,
    content_hash bytea   NOT NULL,
    embedding    bytea   NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, dimensions, content_hash)
);
