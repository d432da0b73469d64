-- The original service's functions and views: same names, argument order and return types, so
-- the tools that call them keep working. Its defects are not kept: reads return the `result`
-- column it actually writes, updates follow the task state machine, and the statistics view
-- does not divide by zero on an empty table.

-- Versions the original left behind in some databases: the 8-argument create of its first
-- schema, and the timestamp (not timestamptz) overload of update from its migration 001, which
-- made untyped calls ambiguous. Older shapes of some functions differ in what CREATE OR REPLACE
-- cannot change: the find functions' result column (data -> result), update's parameter name
-- (p_data before the original's 816988b), the metrics' result columns (no total before e517c49).
DROP FUNCTION IF EXISTS create_web_crawl_task(uuid, varchar, text, varchar, timestamptz, task_status, timestamptz, timestamptz);
DROP FUNCTION IF EXISTS update_web_crawl_task(uuid, task_status, text, timestamp, timestamp);
DROP FUNCTION IF EXISTS update_web_crawl_task(uuid, task_status, text, timestamptz, timestamptz);
DROP FUNCTION IF EXISTS get_web_crawl_metrics(integer);
DROP FUNCTION IF EXISTS find_web_crawl_task_by_id(uuid);
DROP FUNCTION IF EXISTS find_web_crawl_tasks_by_status(task_status);
DROP VIEW IF EXISTS completed_web_crawl_tasks;
DROP VIEW IF EXISTS pending_web_crawl_tasks;
DROP VIEW IF EXISTS web_crawl_task_statistics;

CREATE OR REPLACE FUNCTION create_web_crawl_task(
    p_user_email   varchar(255),
    p_user_query   text,
    p_original_url varchar(2048),
    p_received_at  timestamptz,
    p_status       task_status,
    p_created_at   timestamptz,
    p_updated_at   timestamptz
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at, status,
                                 created_at, updated_at)
    VALUES (p_user_email, p_user_query, p_original_url, p_received_at, p_status,
            p_created_at, p_updated_at)
    RETURNING id
$$;

-- Applies one update through the consumer's set-based function, so both follow one state
-- machine. Raises for an unknown id (as the original did) and for a refused transition.
-- p_updated_at is accepted for compatibility; the trigger sets updated_at.
CREATE OR REPLACE FUNCTION update_web_crawl_task(
    p_id          uuid,
    p_status      task_status,
    p_result      text,
    p_finished_at timestamptz,
    p_updated_at  timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_outcome text;
BEGIN
    SELECT u.outcome INTO v_outcome
    FROM tm_apply_status_updates(ARRAY[p_id], ARRAY[p_status], ARRAY[p_result],
                                 ARRAY[p_finished_at]) AS u;
    IF v_outcome = 'task_not_found' THEN
        RAISE EXCEPTION 'Task with id % not found', p_id;
    ELSIF v_outcome = 'invalid_transition' THEN
        RAISE EXCEPTION 'Task with id % cannot move to status %', p_id, p_status
            USING HINT = 'allowed: new -> completed, new -> error, error -> completed';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION find_web_crawl_task_by_id(p_id uuid)
RETURNS TABLE (
    id uuid, user_email varchar(255), user_query text, original_url varchar(2048),
    received_at timestamptz, status task_status, result text, finished_at timestamptz,
    created_at timestamptz, updated_at timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.user_email, t.user_query, t.original_url, t.received_at, t.status, t.result,
           t.finished_at, t.created_at, t.updated_at
    FROM web_crawl_tasks t
    WHERE t.id = p_id
$$;

CREATE OR REPLACE FUNCTION find_web_crawl_tasks_by_status(p_status task_status)
RETURNS TABLE (
    id uuid, user_email varchar(255), user_query text, original_url varchar(2048),
    received_at timestamptz, status task_status, result text, finished_at timestamptz,
    created_at timestamptz, updated_at timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.user_email, t.user_query, t.original_url, t.received_at, t.status, t.result,
           t.finished_at, t.created_at, t.updated_at
    FROM web_crawl_tasks t
    WHERE t.status = p_status
    ORDER BY t.created_at DESC, t.id DESC
$$;

CREATE OR REPLACE FUNCTION count_web_crawl_tasks_by_status(p_status task_status)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer FROM web_crawl_tasks WHERE status = p_status
$$;

-- Windowed counts: tasks created in the last `hours` hours that are now in a status.
CREATE OR REPLACE FUNCTION get_tasks_count_by_status(status_value task_status, hours integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer
    FROM web_crawl_tasks
    WHERE status = status_value AND created_at >= now() - interval '1 hour' * hours
$$;

CREATE OR REPLACE FUNCTION get_new_tasks_count(hours integer) RETURNS integer
LANGUAGE sql STABLE AS $$ SELECT get_tasks_count_by_status('new', hours) $$;

CREATE OR REPLACE FUNCTION get_completed_tasks_count(hours integer) RETURNS integer
LANGUAGE sql STABLE AS $$ SELECT get_tasks_count_by_status('completed', hours) $$;

CREATE OR REPLACE FUNCTION get_error_tasks_count(hours integer) RETURNS integer
LANGUAGE sql STABLE AS $$ SELECT get_tasks_count_by_status('error', hours) $$;

CREATE OR REPLACE FUNCTION get_total_tasks_count_by_creation_time(hours integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer
    FROM web_crawl_tasks
    WHERE created_at >= now() - interval '1 hour' * hours
$$;

-- All four counts in one call; each count is an index-only scan of (status, created_at, id).
CREATE OR REPLACE FUNCTION get_web_crawl_metrics(hours integer)
RETURNS TABLE (
    new_tasks_count integer, completed_tasks_count integer, error_tasks_count integer,
    total_tasks_count integer
)
LANGUAGE sql STABLE AS $$
    WITH counts AS (
        SELECT get_tasks_count_by_status('new', hours) AS n,
               get_tasks_count_by_status('completed', hours) AS c,
               get_tasks_count_by_status('error', hours) AS e
    )
    SELECT n, c, e, n + c + e FROM counts
$$;

CREATE VIEW completed_web_crawl_tasks AS
    SELECT t.*,
           t.status = 'completed' AS is_successful,
           EXTRACT(EPOCH FROM t.finished_at - t.received_at) AS duration_seconds
    FROM web_crawl_tasks t
    WHERE t.status IN ('completed', 'error');

CREATE VIEW pending_web_crawl_tasks AS
    SELECT t.*,
           EXTRACT(EPOCH FROM now() - t.received_at) AS age_seconds
    FROM web_crawl_tasks t
    WHERE t.status = 'new';

-- completion_rate: the percentage of tasks that completed successfully; 0 on an empty table.
CREATE VIEW web_crawl_task_statistics AS
    SELECT count(*) AS total_tasks,
           count(*) FILTER (WHERE status = 'new') AS pending_tasks,
           count(*) FILTER (WHERE status = 'completed') AS successful_tasks,
           count(*) FILTER (WHERE status = 'error') AS failed_tasks,
           COALESCE(round(100.0 * count(*) FILTER (WHERE status = 'completed')
                          / NULLIF(count(*), 0), 2), 0) AS completion_rate
    FROM web_crawl_tasks;
