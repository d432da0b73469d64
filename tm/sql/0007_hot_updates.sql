-- Updates that PostgreSQL can make HOT (heap-only: the new version of the row on the same page,
-- no index touched), and the reads that the status index served, served without it.
--
-- An update is HOT only when no indexed column changes and the row's page has room. Every
-- status update changes `status`, which (status, created_at, id) indexes, so every update wrote a
-- new entry in all three indexes (0 HOT of every update measured). 0009 drops that index; here:
--
-- 1. Room on the page: new pages are filled to 60 %. Measured on this workload (a `new` and
--    then an update for every task, the updates in the order six partitions deliver them), once
--    the index was gone: at 60 % every update was HOT, at 70 % 99 %, at 80 % 78 %, at 100 %
--    45-70 %; once every task was updated the heap was 9 % larger at 60 % than at 100 % (the
--    updated versions take most of the room either way). Rows already stored keep their pages; the
--    setting applies to the pages written from now on.
-- 2. updated_at is set by the batch update itself, not by the row trigger: the trigger keeps its
--    name and still fires for any other UPDATE (the original service's path, a hand-written
--    statement), but only when the statement left updated_at as it was (a WHEN clause, checked
--    without calling PL/pgSQL).
-- 3. A batch in which no task appears twice skips the recursive fold (15 % of PostgreSQL's CPU
--    per update, measured).
-- 4. The listing by status walks the hours that hold tasks of that status (the hourly counts
--    know them) newest first, and reads each through (created_at, id).
-- 5. The windowed counts no longer count the partial first hour of their window through the
--    status index: tasks are also counted per minute, so that at most the first minute is read
--    from the table.

ALTER TABLE web_crawl_tasks SET (fillfactor = 60);

DROP TRIGGER IF EXISTS update_web_crawl_tasks_updated_at ON web_crawl_tasks;
CREATE TRIGGER update_web_crawl_tasks_updated_at
    BEFORE UPDATE ON web_crawl_tasks
    FOR EACH ROW
    WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION update_updated_at_column();

-- The state machine of one update, as 0006's fold decided it: the outcome of moving a task from
-- its stored (status, result, finished_at) to the event's. One expression, inlined where it is
-- used.
CREATE OR REPLACE FUNCTION tm_status_outcome(
    p_status task_status, p_result text, p_finished_at timestamptz,
    p_new_status task_status, p_new_result text, p_new_finished_at timestamptz
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_status = p_new_status AND p_result IS NOT DISTINCT FROM p_new_result
            THEN 'unchanged'
        WHEN (p_status = 'new' AND p_new_status IN ('completed', 'error'))
          OR (p_status = 'error' AND p_new_status = 'completed')
            THEN 'updated'
        WHEN p_new_finished_at < p_finished_at
            THEN 'unchanged'  -- stale: older than the state it would replace
        ELSE 'invalid_transition'
    END
$$;

-- 0006's function, two changes: the UPDATE sets updated_at (the row trigger then does not fire),
-- and a batch in which no task appears twice, the common case, is decided row by row against
-- the stored rows, without 0006's recursive fold (which applies a task's updates one after the
-- other, and stays for the batches that need it). Same arguments, results and outcomes.
CREATE OR REPLACE FUNCTION tm_apply_status_updates(
    p_ids          uuid[],
    p_statuses     task_status[],
    p_results      text[],
    p_finished_ats timestamptz[]
) RETURNS TABLE (ord integer, outcome text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(p_ids) = (SELECT count(DISTINCT u) FROM unnest(p_ids) u) THEN
        RETURN QUERY
            WITH input AS (
                SELECT u.ord::integer AS ord, u.id, u.status, u.result, u.finished_at
                FROM unnest(p_ids, p_statuses, p_results, p_finished_ats)
                     WITH ORDINALITY AS u (id, status, result, finished_at, ord)
            ), stored AS (
                SELECT t.id, t.status, t.result, t.finished_at
                FROM web_crawl_tasks t
                WHERE t.id = ANY (p_ids)
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
            SELECT d.ord, d.outcome FROM decided d ORDER BY d.ord;
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

-- A session caches the plans of these functions after a few calls. Cached while the table was
-- empty or small, the cheapest plan of their lookups by id (and of the UPDATE's join) reads the
-- table whole, and a session kept it until the table was next analyzed: a worker that started
-- on a new table read every row at every batch (seen as 20-130 ms database calls at 5,000
-- tasks a second in benchmarks on fresh databases). Their lookups are by primary key whatever
-- the table holds, so a sequential scan is never what they want.
ALTER FUNCTION tm_create_tasks(uuid[], text[], text[], text[], timestamptz[])
    SET enable_seqscan = off;
ALTER FUNCTION tm_apply_status_updates(uuid[], task_status[], text[], timestamptz[])
    SET enable_seqscan = off;

-- Tasks of one status, newest first, strictly before (p_before_created_at, p_before_id) when
-- given, at most p_limit; result cut to p_result_chars characters. The hours come from the hourly
-- counts, newest first, skipping the hours without a task of that status; each hour's range ends
-- where the next newer one begins, so that no task is returned twice even if two counters' hours
-- overlap. A page costs the tasks read in the hours it passes through: about p_limit divided by
-- the share of that status among them.
CREATE OR REPLACE FUNCTION tm_list_tasks_by_status(
    p_status            task_status,
    p_limit             integer,
    p_result_chars      integer,
    p_before_created_at timestamptz DEFAULT NULL,
    p_before_id         uuid DEFAULT NULL
) RETURNS TABLE (
    id uuid, user_email varchar(255), user_query text, original_url varchar(2048),
    received_at timestamptz, status task_status, result text, finished_at timestamptz,
    created_at timestamptz, updated_at timestamptz
)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_hour  timestamptz;
    v_until timestamptz := 'infinity';
    v_left  integer := p_limit;
    v_found integer;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    FOR v_hour IN
        SELECT c.hour FROM web_crawl_task_hourly_counts c
        WHERE c.status = p_status AND c.tasks > 0
          AND (p_before_created_at IS NULL OR c.hour <= p_before_created_at)
        ORDER BY c.hour DESC
    LOOP
        RETURN QUERY
            SELECT t.id, t.user_email, t.user_query, t.original_url, t.received_at, t.status,
                   left(t.result, p_result_chars), t.finished_at, t.created_at, t.updated_at
            FROM web_crawl_tasks t
            WHERE t.created_at >= v_hour
              AND t.created_at < least(v_hour + interval '1 hour', v_until)
              AND (p_before_created_at IS NULL
                   OR (t.created_at, t.id) < (p_before_created_at, p_before_id))
              AND t.status = p_status
            ORDER BY t.created_at DESC, t.id DESC
            LIMIT v_left;
        GET DIAGNOSTICS v_found = ROW_COUNT;
        v_left := v_left - v_found;
        EXIT WHEN v_left <= 0;
        v_until := v_hour;
    END LOOP;
END
$$;

-- Tasks per minute of created_at and current status, kept by the same triggers as the hourly
-- counts (0004), which now upsert both. They are whole from `since` in
-- web_crawl_task_minute_counts_since: on a table that had rows when this ran, from the minute after
-- next (counting the rows already there would hold the writers off for a scan of the whole
-- table; a row is created with created_at = now(), so every row from that minute on is counted as
-- it is written); on an empty table, from the start.
CREATE TABLE IF NOT EXISTS web_crawl_task_minute_counts (
    minute timestamptz NOT NULL,
    status task_status NOT NULL,
    tasks  bigint      NOT NULL,
    PRIMARY KEY (minute, status)
);
COMMENT ON TABLE web_crawl_task_minute_counts IS
    'Tasks per minute of created_at and current status; kept by triggers on web_crawl_tasks';

CREATE TABLE IF NOT EXISTS web_crawl_task_minute_counts_since (since timestamptz NOT NULL);
COMMENT ON TABLE web_crawl_task_minute_counts_since IS
    'The first minute from which web_crawl_task_minute_counts counts every task';
INSERT INTO web_crawl_task_minute_counts_since (since)
SELECT CASE WHEN EXISTS (SELECT 1 FROM web_crawl_tasks) THEN
                date_trunc('minute', clock_timestamp()) + interval '2 minutes'
            ELSE '-infinity' END
WHERE NOT EXISTS (SELECT 1 FROM web_crawl_task_minute_counts_since);

-- 0004's function, each change counted per minute, and per hour from the same deltas (one
-- statement per change: the deltas are grouped once, upserted twice).
CREATE OR REPLACE FUNCTION tm_count_tasks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        WITH d AS MATERIALIZED (
            SELECT date_trunc('minute', n.created_at) AS minute, n.status, count(*) AS delta
            FROM new_rows n GROUP BY 1, 2
        ), by_minute AS (
            INSERT INTO web_crawl_task_minute_counts AS c (minute, status, tasks)
            SELECT d.minute, d.status, d.delta FROM d ORDER BY 1, 2
            ON CONFLICT (minute, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks
        )
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT date_trunc('hour', d.minute), d.status, sum(d.delta) FROM d
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH d AS MATERIALIZED (
            SELECT u.minute, u.status, sum(u.delta) AS delta
            FROM (
                SELECT date_trunc('minute', n.created_at) AS minute, n.status, 1 AS delta
                FROM new_rows n
                UNION ALL
                SELECT date_trunc('minute', o.created_at), o.status, -1 FROM old_rows o
            ) u
            GROUP BY 1, 2
            HAVING sum(u.delta) <> 0
        ), by_minute AS (
            INSERT INTO web_crawl_task_minute_counts AS c (minute, status, tasks)
            SELECT d.minute, d.status, d.delta FROM d ORDER BY 1, 2
            ON CONFLICT (minute, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks
        )
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT date_trunc('hour', d.minute), d.status, sum(d.delta) FROM d
        GROUP BY 1, 2 HAVING sum(d.delta) <> 0 ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSIF TG_OP = 'DELETE' THEN
        WITH d AS MATERIALIZED (
            SELECT date_trunc('minute', o.created_at) AS minute, o.status, -count(*) AS delta
            FROM old_rows o GROUP BY 1, 2
        ), by_minute AS (
            INSERT INTO web_crawl_task_minute_counts AS c (minute, status, tasks)
            SELECT d.minute, d.status, d.delta FROM d ORDER BY 1, 2
            ON CONFLICT (minute, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks
        )
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT date_trunc('hour', d.minute), d.status, sum(d.delta) FROM d
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSE  -- TRUNCATE
        DELETE FROM web_crawl_task_hourly_counts;
        DELETE FROM web_crawl_task_minute_counts;
    END IF;
    RETURN NULL;
END
$$;

-- Tasks created at or after p_since, by their current status: 0004's get_web_crawl_metrics for
-- any start. The hourly counters give the whole hours after the first; the minute counters the
-- whole minutes of the first hour after the first minute; the part of the first minute from
-- p_since on is counted in the table. Before the minute counters are whole, the first hour is
-- read from the table from its shorter side: the tasks from p_since to the end of the hour, or
-- the hour's counter less the tasks before p_since.
CREATE OR REPLACE FUNCTION tm_web_crawl_metrics_since(p_since timestamptz)
RETURNS TABLE (
    new_tasks_count integer, completed_tasks_count integer, error_tasks_count integer,
    total_tasks_count integer
)
LANGUAGE sql STABLE
-- The planner cannot know how few rows the partial minute holds and would compile the query
-- (hundreds of ms) to save microseconds.
SET jit = off
AS $$
    WITH edge AS (
        SELECT p_since AS since, date_trunc('hour', p_since) AS first_hour,
               date_trunc('minute', p_since) AS first_minute,
               date_trunc('minute', p_since)
                   >= (SELECT w.since FROM web_crawl_task_minute_counts_since w) AS by_minute,
               p_since - date_trunc('hour', p_since) < interval '30 minutes' AS head_is_shorter
    ), counted AS (
        SELECT c.status, c.tasks
        FROM web_crawl_task_hourly_counts c, edge
        WHERE c.hour > edge.first_hour
      UNION ALL
        SELECT m.status, m.tasks
        FROM web_crawl_task_minute_counts m, edge
        WHERE edge.by_minute
          AND m.minute > edge.first_minute AND m.minute < edge.first_hour + interval '1 hour'
      UNION ALL
        SELECT t.status, count(*)
        FROM edge, web_crawl_tasks t
        WHERE edge.by_minute
          AND t.created_at >= edge.since AND t.created_at < edge.first_minute + interval '1 minute'
        GROUP BY t.status
      UNION ALL
        SELECT c.status, c.tasks
        FROM web_crawl_task_hourly_counts c, edge
        WHERE NOT edge.by_minute AND edge.head_is_shorter AND c.hour = edge.first_hour
      UNION ALL
        SELECT t.status, -count(*)
        FROM edge, web_crawl_tasks t
        WHERE NOT edge.by_minute AND edge.head_is_shorter
          AND t.created_at >= edge.first_hour AND t.created_at < edge.since
        GROUP BY t.status
      UNION ALL
        SELECT t.status, count(*)
        FROM edge, web_crawl_tasks t
        WHERE NOT edge.by_minute AND NOT edge.head_is_shorter
          AND t.created_at >= edge.since AND t.created_at < edge.first_hour + interval '1 hour'
        GROUP BY t.status
    ), totals AS (
        SELECT COALESCE(sum(tasks) FILTER (WHERE status = 'new'), 0)::integer AS n,
               COALESCE(sum(tasks) FILTER (WHERE status = 'completed'), 0)::integer AS c,
               COALESCE(sum(tasks) FILTER (WHERE status = 'error'), 0)::integer AS e
        FROM counted
    )
    SELECT n, c, e, n + c + e FROM totals
$$;

-- Same name, arguments and answer as 0004's.
CREATE OR REPLACE FUNCTION get_web_crawl_metrics(hours integer)
RETURNS TABLE (
    new_tasks_count integer, completed_tasks_count integer, error_tasks_count integer,
    total_tasks_count integer
)
LANGUAGE sql STABLE AS $$
    SELECT * FROM tm_web_crawl_metrics_since(now() - interval '1 hour' * hours)
$$;

-- The original service's counts, same names, arguments and answers, from the counters: without
-- the status index they would read every task of their window.
CREATE OR REPLACE FUNCTION get_tasks_count_by_status(status_value task_status, hours integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE status_value
               WHEN 'new' THEN m.new_tasks_count
               WHEN 'completed' THEN m.completed_tasks_count
               ELSE m.error_tasks_count
           END
    FROM tm_web_crawl_metrics_since(now() - interval '1 hour' * hours) m
$$;

CREATE OR REPLACE FUNCTION get_total_tasks_count_by_creation_time(hours integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT m.total_tasks_count FROM tm_web_crawl_metrics_since(now() - interval '1 hour' * hours) m
$$;

CREATE OR REPLACE FUNCTION count_web_crawl_tasks_by_status(p_status task_status)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(c.tasks), 0)::integer
    FROM web_crawl_task_hourly_counts c
    WHERE c.status = p_status
$$;
