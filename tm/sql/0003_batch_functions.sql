-- The consumer's set-based functions: one call applies a whole batch from parallel arrays and
-- returns one outcome per input row, in input order (`ord` is the 1-based position). They never
-- raise for a data-level outcome; a row PostgreSQL itself refuses (SQLSTATE 22xxx/23xxx) fails
-- the call, and the consumer isolates it by splitting the batch.

-- New tasks. The id is chosen by the consumer (the task_id header, or a UUIDv5 of the event's
-- Kafka coordinates), so a redelivered event finds its row: `duplicate`, nothing written. Within
-- one call the first occurrence of an id is `created` and later ones `duplicate`.
CREATE OR REPLACE FUNCTION tm_create_tasks(
    p_ids           uuid[],
    p_user_emails   text[],
    p_user_queries  text[],
    p_original_urls text[],
    p_received_ats  timestamptz[]
) RETURNS TABLE (ord integer, id uuid, outcome text)
LANGUAGE sql AS $$
    WITH input AS (
        SELECT u.ord::integer AS ord, u.id, u.user_email, u.user_query, u.original_url,
               u.received_at,
               u.ord = min(u.ord) OVER (PARTITION BY u.id) AS is_first
        FROM unnest(p_ids, p_user_emails, p_user_queries, p_original_urls, p_received_ats)
             WITH ORDINALITY AS u (id, user_email, user_query, original_url, received_at, ord)
    ), inserted AS (
        INSERT INTO web_crawl_tasks AS t (id, user_email, user_query, original_url, received_at)
        SELECT i.id, i.user_email, i.user_query, i.original_url, i.received_at
        FROM input i
        WHERE i.is_first
        ON CONFLICT (id) DO NOTHING
        RETURNING t.id
    )
    SELECT i.ord, i.id,
           CASE WHEN i.is_first AND ins.id IS NOT NULL THEN 'created' ELSE 'duplicate' END
    FROM input i
    LEFT JOIN inserted ins ON ins.id = i.id
    ORDER BY i.ord
$$;

-- Status updates, following the task state machine:
--   new -> completed, new -> error, error -> completed (a retried crawl succeeded);
--   completed is final; an update identical to the stored state (status and result) is
--   `unchanged` and writes nothing; a refused move older than the stored state (its
--   finished_at before the stored finished_at) is stale history, for example the `error` of an
--   error -> completed pair delivered again, and is `unchanged` too; any other move is
--   `invalid_transition`; an unknown id is `task_not_found`.
-- Several updates for one id in one call are applied in input order (a recursive fold over each
-- id's updates), and each row is written once with its final state. The stored rows are locked
-- (in id order, so concurrent batches cannot deadlock on each other) before they are read.
CREATE OR REPLACE FUNCTION tm_apply_status_updates(
    p_ids          uuid[],
    p_statuses     task_status[],
    p_results      text[],
    p_finished_ats timestamptz[]
) RETURNS TABLE (ord integer, outcome text)
LANGUAGE sql AS $$
    WITH RECURSIVE input AS (
        SELECT u.ord::integer AS ord, u.id, u.status, u.result, u.finished_at,
               row_number() OVER (PARTITION BY u.id ORDER BY u.ord)::integer AS step
        FROM unnest(p_ids, p_statuses, p_results, p_finished_ats)
             WITH ORDINALITY AS u (id, status, result, finished_at, ord)
    ), stored AS (
        SELECT t.id, t.status, t.result, t.finished_at
        FROM web_crawl_tasks t
        WHERE t.id = ANY (p_ids)
        ORDER BY t.id
        FOR UPDATE
    ), fold (id, step, status, result, finished_at, outcome) AS (
        SELECT s.id, 0, s.status, s.result, s.finished_at, NULL::text
        FROM stored s
      UNION ALL
        SELECT f.id, i.step,
               CASE WHEN d.outcome = 'updated' THEN i.status ELSE f.status END,
               CASE WHEN d.outcome = 'updated' THEN i.result ELSE f.result END,
               CASE WHEN d.outcome = 'updated' THEN i.finished_at ELSE f.finished_at END,
               d.outcome
        FROM fold f
        JOIN input i ON i.id = f.id AND i.step = f.step + 1
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN f.status = i.status AND f.result IS NOT DISTINCT FROM i.result
                    THEN 'unchanged'
                WHEN (f.status = 'new' AND i.status IN ('completed', 'error'))
                  OR (f.status = 'error' AND i.status = 'completed')
                    THEN 'updated'
                WHEN i.finished_at < f.finished_at
                    THEN 'unchanged'  -- stale: older than the state it would replace
                ELSE 'invalid_transition'
            END AS outcome
        ) d
    ), final AS (
        SELECT DISTINCT ON (f.id) f.id, f.status, f.result, f.finished_at
        FROM fold f
        WHERE f.outcome = 'updated'
        ORDER BY f.id, f.step DESC
    ), written AS (
        UPDATE web_crawl_tasks t
        SET status = fi.status, result = fi.result, finished_at = fi.finished_at
        FROM final fi
        WHERE t.id = fi.id
        RETURNING t.id
    )
    SELECT i.ord, COALESCE(f.outcome, 'task_not_found')
    FROM input i
    LEFT JOIN fold f ON f.id = i.id AND f.step = i.step
    ORDER BY i.ord
$$;
