-- 0008_long_texts: what a target does with a text longer than the model's input limit.
--
-- truncate (the default): the worker cuts the text to the limit, counted with the model's
-- tokenizer (or a conservative estimate), embeds that, and marks the item done with a detail
-- ("truncated to 8,191 of 23,125 tokens"); fail: the item ends failed, saying how long it was.
-- Set with `queue-processor register TABLE --length-policy ...` or
-- embedding_target_set_length_policy (sql/functions/27_long_texts.sql).
ALTER TABLE embedding_targets
    ADD COLUMN length_policy text NOT NULL DEFAULT 'truncate'
        CHECK (length_policy IN ('truncate', 'fail'));
