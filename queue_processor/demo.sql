-- The `queue-processor demo` statements (loaded by name by demo.py, same format as queries.sql).
--
-- The demo owns one table, public.demo_documents. Identifier slots ({vector}, {opclass},
-- {distance}) are filled by queue_processor.db with quoted identifiers naming pgvector's objects in
-- whatever schema the extension lives in ({distance}: queries.sql's cosine_distance_operator);
-- {dims} is a checked positive integer (a type modifier cannot be a bound parameter).
-- Values are always bound parameters.

-- name: vector_schema
-- The schema pgvector is installed in (no row when it is not installed).
SELECT n.nspname AS schema
  FROM pg_extension AS e JOIN pg_namespace AS n ON n.oid = e.extnamespace
 WHERE e.extname = 'vector';

-- name: create_vector_extension
-- Install pgvector (the embedded PostgreSQL ships it; elsewhere this needs the privilege).
CREATE EXTENSION IF NOT EXISTS vector;

-- name: table_shape
-- Whether demo_documents exists and the dimensions of its embedding column (NULL when the
-- column is missing or not a fixed-dimension vector): decides keep versus recreate.
SELECT to_regclass('public.demo_documents') IS NOT NULL AS present,
       (SELECT nullif(a.atttypmod, -1)
          FROM pg_attribute AS a
         WHERE a.attrelid = to_regclass('public.demo_documents')
           AND a.attname = 'embedding' AND a.attnum > 0 AND NOT a.attisdropped) AS dims;

-- name: drop_table
-- Drop the demo table (its target is unregistered first, which drops the triggers).
DROP TABLE IF EXISTS public.demo_documents;

-- name: create_table
-- The demo table: content columns, the vector, and the two companion columns the worker
-- fills (model name, write time).
CREATE TABLE IF NOT EXISTS public.demo_documents (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title       text NOT NULL,
    body        text NOT NULL,
    topic       text NOT NULL,
    embedding   {vector}({dims}),
    model       text,
    embedded_at timestamptz
);

-- name: create_index
-- Cosine HNSW index (m = 16, ef_construction = 64, as in the seeds) so the searches below
-- are index scans; built incrementally as the worker writes vectors.
CREATE INDEX IF NOT EXISTS demo_documents_embedding_hnsw
    ON public.demo_documents USING hnsw (embedding {opclass})
  WITH (m = 16, ef_construction = 64);

-- name: reset_documents
-- Empty the table so a re-run starts from the shipped documents. The target's TRUNCATE
-- trigger removes its queue rows (done, failed or left in flight by an interrupted run).
TRUNCATE public.demo_documents RESTART IDENTITY;

-- name: insert_documents
-- Insert every document in one statement: the statement-level insert trigger queues them
-- all with one set-based INSERT into embedding_queue (the outbox), in file order.
INSERT INTO public.demo_documents (title, body, topic)
SELECT d.title, d.body, d.topic
  FROM unnest(%(titles)s::text[], %(bodies)s::text[], %(topics)s::text[])
       WITH ORDINALITY AS d (title, body, topic, n)
 ORDER BY d.n;

-- name: coverage
-- How many demo rows have a vector, and the newest write time (the "before" watermark).
SELECT count(*) AS total,
       count(*) FILTER (WHERE embedding IS NOT NULL) AS embedded,
       max(embedded_at) AS last_embedded_at
  FROM public.demo_documents;

-- name: search
-- The k rows nearest to the query vector by cosine distance. ORDER BY the operator on the
-- column itself so the HNSW index serves it; OPERATOR(schema.<=>) finds pgvector's operator
-- even when its schema is not on the search_path.
SELECT d.id, d.title, d.topic,
       d.embedding OPERATOR({distance}) %(query)b::real[]::{vector} AS distance
  FROM public.demo_documents AS d
 WHERE d.embedding IS NOT NULL
 ORDER BY d.embedding OPERATOR({distance}) %(query)b::real[]::{vector}
 LIMIT %(k)s;

-- name: find_document
-- One demo row by title, with its companion columns.
SELECT id, title, topic, model, embedded_at
  FROM public.demo_documents
 WHERE title = %(title)s
 ORDER BY id
 LIMIT 1;

-- name: get_document
-- One demo row by id, with its companion columns.
SELECT id, title, topic, model, embedded_at FROM public.demo_documents WHERE id = %(id)s;

-- name: neighbours
-- The k nearest other rows of one row, by cosine distance between stored vectors (a
-- LATERAL subquery, so the inner ORDER BY ... LIMIT can use the HNSW index).
SELECT n.id, n.title, n.topic, n.distance
  FROM public.demo_documents AS d
 CROSS JOIN LATERAL (
       SELECT o.id, o.title, o.topic,
              o.embedding OPERATOR({distance}) d.embedding AS distance
         FROM public.demo_documents AS o
        WHERE o.id <> d.id AND o.embedding IS NOT NULL
        ORDER BY o.embedding OPERATOR({distance}) d.embedding
        LIMIT %(k)s) AS n
 WHERE d.id = %(id)s
 ORDER BY n.distance;

-- name: update_document
-- Rewrite one row's content; the update trigger re-queues exactly this row.
UPDATE public.demo_documents
   SET title = %(title)s, body = %(body)s, topic = %(topic)s
 WHERE id = %(id)s;

-- name: embedded_since
-- Rows whose vector was written after a watermark: what the second drain re-embedded.
SELECT id, title FROM public.demo_documents WHERE embedded_at > %(since)s ORDER BY id;
