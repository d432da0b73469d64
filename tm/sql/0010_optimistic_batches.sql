-- The batch functions try the common case first, with the cheapest statement that can decide it,
-- and fall back to the earlier statements (the same ones, unchanged in what they decide) for the
-- rows that the first statement could not:
--
-- 1. tm_create_tasks: a batch of tasks that are all new to the table, the common case, is a plain
--    INSERT. `ON CONFLICT DO NOTHING` inserts speculatively (one more WAL record and one more index
--    probe a row) and the statement also had to look up the ids it did not insert; together about
--    a third of PostgreSQL's CPU per new task (measured on one backend: 9.7 -> 6.4 µs a row). A
--    repeated id (in the batch, already stored, or inserted meanwhile by another worker) raises
--    unique_violation: the insert is undone with its subtransaction (its rows left for vacuum)
--    and the whole batch goes through 0006's statement, which decides created / duplicate /
--    unchanged row by row. The rows are still inserted in id order, so that two workers inserting
--    overlapping batches wait for each other in one order.
-- 2. tm_apply_status_updates: in a batch in which no task appears twice, every row whose
--    transition is valid against the task's current version is updated by one UPDATE, which finds
--    each task once (0007 read each task with `FOR UPDATE` and then updated it: two visits and a
--    lock record a row; measured on one backend: 10.2 -> 7.8 µs a row). An UPDATE that meets a row
--    another transaction is changing waits for it and evaluates the transition again on the
--    version it left, so a concurrent change is never overwritten. The rows it did not update
--    (unchanged, stale, invalid or unknown tasks: rare) are decided as 0007 decided them, each
--    against its current version under a row lock. Batches with repeated tasks keep the fold.
-- 3. updated_at: 0007's row trigger fired only for UPDATEs that left updated_at as it was, but a
--    BEFORE ROW UPDATE trigger makes PostgreSQL lock every row before the trigger's WHEN clause
--    is even looked at: one more WAL record (53 B) and 0.3-0.9 µs a row for every update, the
--    batch's included. The trigger keeps its name and its effect (any UPDATE that leaves
--    updated_at as it was gets now()) as a statement trigger: after a statement that set every
--    row's updated_at to now(), as the batch does, it reads the changed rows once and stops; after
--    any other, it sets updated_at on the rows whose value the statement left unchanged (a second
--    version of those rows, in the same transaction). A statement that changes a task's id is
--    not followed (nothing changes ids).
--
-- Same arguments, results and outcomes as before.

-- Replacing the trigger needs the table's exclusive lock, which waits for every transaction that
-- holds a lock on the table (a long report, say), and every writer queues behind that wait. So
-- it waits at most 5 s: past that, this migration fails with a lock timeout, nothing of it
-- applied, and `tm db migrate` (its Job retries) tries again later, instead of holding the
-- consumers up for as long as the report runs.
SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION tm_create_tasks(
    p_ids           uuid[],
    p_user_emails   text[],
    p_user_queries  text[],
    p_original_urls text[],
    p_received_ats  timestamptz[]
) RETURNS TABLE (ord integer, id uuid, outcome text)
LANGUAGE plpgsql
SET enable_seqscan = off  -- see 0007
AS $$
#variable_conflict use_column
BEGIN
    BEGIN
        INSERT INTO web_crawl_tasks AS t (id, user_email, user_query, original_url, received_at)
        SELECT u.id, u.user_email, u.user_query, u.original_url, u.received_at
        FROM unnest(p_ids, p_user_emails, p_user_queries, p_original_urls, p_received_ats)
             AS u (id, user_email, user_query, original_url, received_at)
        ORDER BY u.id;
        RETURN QUERY
            SELECT u.ord::integer, u.id, 'created'::text
            FROM unnest(p_ids) WITH ORDINALITY AS u (id, ord);
        RETURN;
    EXCEPTION WHEN unique_violation THEN
        NULL;  -- an id is repeated or stored: decided row by row below
    END;
    RETURN QUERY
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
            ORDER BY i.id
            ON CONFLICT (id) DO NOTHING
            RETURNING t.id
        ), stored AS (
            SELECT t.id, t.status
            FROM web_crawl_tasks t
            WHERE t.id = ANY (ARRAY(
                SELECT i.id FROM input i
                WHERE i.is_first AND i.id NOT IN (SELECT ins.id FROM inserted ins)
            ))
        )
        SELECT i.ord, i.id,
               CASE
                   WHEN i.is_first AND ins.id IS NOT NULL THEN 'created'
                   WHEN s.status <> 'new' THEN 'unchanged'
                   ELSE 'duplicate'
               END
        FROM input i
        LEFT JOIN inserted ins ON ins.id = i.id
        LEFT JOIN stored s ON s.id = i.id
        ORDER BY i.ord;
END
$$;

CREATE OR REPLACE FUNCTION tm_apply_status_updates(
    p_ids          uuid[],
    p_statuses     task_status[],
    p_results      text[],
    p_finished_ats timestamptz[]
) RETURNS TABLE (ord integer, outcome text)
LANGUAGE plpgsql
SET enable_seqscan = off  -- see 0007
AS $$
#variable_conflict use_column
DECLARE
    v_updated integer[];
BEGIN
    IF cardinality(p_ids) = (SELECT count(DISTINCT u) FROM unnest(p_ids) u) THEN
        WITH input AS (
            SELECT u.ord::integer AS ord, u.id, u.status, u.result, u.finished_at
            FROM unnest(p_ids, p_statuses, p_results, p_finished_ats)
                 WITH ORDINALITY AS u (id, status, result, finished_at, ord)
        ), written AS (
            UPDATE web_crawl_tasks t
            SET status = i.status, result = i.result, finished_at = i.finished_at,
                updated_at = now()
            FROM input i
            WHERE t.id = ANY (p_ids) AND t.id = i.id
              AND tm_status_outcome(t.status, t.result, t.finished_at,
                                    i.status, i.result, i.finished_at) = 'updated'
            RETURNING i.ord
        )
        SELECT COALESCE(array_agg(w.ord ORDER BY w.ord), '{}') INTO v_updated FROM written w;
        IF cardinality(v_updated) = cardinality(p_ids) THEN
            RETURN QUERY SELECT u.ord, 'updated'::text FROM unnest(v_updated) AS u (ord);
            RETURN;
        END IF;
        -- The rest, each decided against its current version under a row lock (0007's
        -- row-by-row statement); one of them can still be updated if another transaction
        -- changed it since the UPDATE above looked.
        RETURN QUERY
            WITH input AS (
                SELECT u.ord::integer AS ord, u.id, u.status, u.result, u.finished_at
                FROM unnest(p_ids, p_statuses, p_results, p_finished_ats)
                     WITH ORDINALITY AS u (id, status, result, finished_at, ord)
                WHERE u.ord <> ALL (v_updated)
            ), stored AS (
                SELECT t.id, t.status, t.result, t.finished_at
                FROM web_crawl_tasks t
                WHERE t.id = ANY (ARRAY(SELECT i.id FROM input i))
                ORDER BY t.id
                FOR UPDATE
            ), decided AS (
                SELECT i.ord, i.id, i.status, i.result, i.finished_at,
                       CASE WHEN s.id IS NULL THEN 'task_not_found'
                            ELSE tm_status_outcome(s.status, s.result, s.finished_at,
                                                   i.status, i.result, i.finished_at)
                       END AS outcome
                FROM input i
                LEFT JOIN stored s ON s.id = i.id
            ), written AS (
                UPDATE web_crawl_tasks t
                SET status = d.status, result = d.result, finished_at = d.finished_at,
                    updated_at = now()
                FROM decided d
                WHERE d.outcome = 'updated' AND t.id = d.id
            )
            SELECT d.ord, d.outcome FROM decided d
          UNION ALL
            SELECT u.ord, 'updated' FROM unnest(v_updated) AS u (ord)
            ORDER BY 1;
        RETURN;
    END IF;
    RETURN QUERY
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
                SELECT tm_status_outcome(f.status, f.result, f.finished_at,
                                         i.status, i.result, i.finished_at) AS outcome
            ) d
        ), final AS (
            SELECT DISTINCT ON (f.id) f.id, f.status, f.result, f.finished_at
            FROM fold f
            WHERE f.outcome = 'updated'
            ORDER BY f.id, f.step DESC
        ), written AS (
            UPDATE web_crawl_tasks t
            SET status = fi.status, result = fi.result, finished_at = fi.finished_at,
                updated_at = now()
            FROM final fi
            WHERE t.id = fi.id
            RETURNING t.id
        )
        SELECT i.ord, COALESCE(f.outcome, 'task_not_found')
        FROM input i
        LEFT JOIN fold f ON f.id = i.id AND f.step = i.step
        ORDER BY i.ord;
END
$$;

CREATE OR REPLACE FUNCTION tm_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Its own UPDATE below sets now() on every row it changes: the trigger it fires stops here.
    IF EXISTS (SELECT FROM new_rows n WHERE n.updated_at IS DISTINCT FROM now()) THEN
        UPDATE web_crawl_tasks t
        SET updated_at = now()
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        WHERE t.id = n.id AND n.updated_at IS NOT DISTINCT FROM o.updated_at;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS update_web_crawl_tasks_updated_at ON web_crawl_tasks;
CREATE TRIGGER update_web_crawl_tasks_updated_at
    AFTER UPDATE ON web_crawl_tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tm_touch_updated_at();
