-- functions/27_long_texts: a target's policy for texts longer than the model's input limit
-- (migration 0008). See 10_queue.sql for how these files are applied and why every function
-- pins search_path = pg_catalog, pg_temp. Not SECURITY DEFINER: only the owner (who
-- registers targets) calls it; migrate makes it private like every function of ours.

-- Set the length policy of a registered target: 'truncate' or 'fail'. Returns false when
-- the target is not registered; raises invalid_parameter_value for another policy.
CREATE OR REPLACE FUNCTION @qs@.embedding_target_set_length_policy(
    p_table_name text, p_embedding_column text, p_policy text
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_policy IS NULL OR p_policy NOT IN ('truncate', 'fail') THEN
        RAISE EXCEPTION 'the length policy must be truncate or fail, not %',
              coalesce(quote_literal(p_policy), 'NULL')
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM @qs@.embedding_targets
                WHERE table_name = p_table_name AND embedding_column = p_embedding_column
                  AND chunks_table IS NOT NULL) THEN
        RAISE EXCEPTION 'target %.% is chunked: its texts are split, never cut or failed for length',
              p_table_name, quote_ident(p_embedding_column)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE @qs@.embedding_targets
       SET length_policy = p_policy, updated_at = pg_catalog.now()
     WHERE table_name = p_table_name AND embedding_column = p_embedding_column;
    RETURN FOUND;
END;
$$;
