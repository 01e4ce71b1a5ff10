-- 0010_chunks: chunked targets (issue 14, part 2).
--
-- A chunked target turns one source row into N vectors, one per chunk of its text, stored in
-- a companion table that registration creates (embedding_register_chunked_target,
-- sql/functions/28_chunks.sql): <schema>.<relation>_<name>_chunks(record_id, chunk_index,
-- chunk_text, embedding, model, generated_at). Its registry row has length_policy 'chunk',
-- the chunk settings below, and chunks_table, the companion table's name in the source's
-- schema. embedding_column is then the target's name (a label, not a column of the source).
ALTER TABLE embedding_targets
    DROP CONSTRAINT embedding_targets_length_policy_check,
    ADD CONSTRAINT embedding_targets_length_policy_check
        CHECK (length_policy IN ('truncate', 'fail', 'chunk')),
    -- Chunk size in tokens of the provider's tokenizer; overlap below half of it (so each
    -- window advances by more than half its size); at most max_chunks chunks per record.
    ADD COLUMN chunk_tokens integer CHECK (chunk_tokens BETWEEN 16 AND 8192),
    ADD COLUMN chunk_overlap integer CHECK (chunk_overlap >= 0 AND chunk_overlap * 2 < chunk_tokens),
    ADD COLUMN max_chunks integer CHECK (max_chunks BETWEEN 1 AND 10000),
    ADD COLUMN chunks_table text,
    -- Every chunk setting is there exactly when the target is chunked.
    ADD CONSTRAINT embedding_targets_chunk_settings_check CHECK (
        (length_policy = 'chunk') = (chunk_tokens IS NOT NULL)
        AND (length_policy = 'chunk') = (chunk_overlap IS NOT NULL)
        AND (length_policy = 'chunk') = (max_chunks IS NOT NULL)
        AND (length_policy = 'chunk') = (chunks_table IS NOT NULL));
