-- Windowed counts without counting the window: tasks per (hour of created_at, current status),
-- kept by statement-level triggers from the transition tables of each INSERT, UPDATE and DELETE
-- (one upsert per hour and status a statement, not per row), so that get_web_crawl_metrics on a
-- table of millions of rows sums a few dozen counters and counts exactly only the partial hour
-- at the start of the window.

CREATE TABLE IF NOT EXISTS web_crawl_task_hourly_counts (
    hour   timestamptz NOT NULL,
    status task_status NOT NULL,
    tasks  bigint      NOT NULL,
    PRIMARY KEY (hour, status)
);

COMMENT ON TABLE web_crawl_task_hourly_counts IS
    'Tasks per hour of created_at and current status; kept by triggers on web_crawl_tasks';

-- Upserts apply in (hour, status) order, so that concurrent batches lock the counters in one
-- order (a deadlock is still possible across the statements of two transactions, and is retried
-- by the consumer like any other 40P01).
CREATE OR REPLACE FUNCTION tm_count_tasks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT date_trunc('hour', n.created_at), n.status, count(*)
        FROM new_rows n
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT d.hour, d.status, sum(d.delta)
        FROM (
            SELECT date_trunc('hour', n.created_at) AS hour, n.status, 1 AS delta FROM new_rows n
            UNION ALL
            SELECT date_trunc('hour', o.created_at), o.status, -1 FROM old_rows o
        ) d
        GROUP BY 1, 2
        HAVING sum(d.delta) <> 0
        ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO web_crawl_task_hourly_counts AS c (hour, status, tasks)
        SELECT date_trunc('hour', o.created_at), o.status, -count(*)
        FROM old_rows o
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (hour, status) DO UPDATE SET tasks = c.tasks + EXCLUDED.tasks;
    ELSE  -- TRUNCATE
        DELETE FROM web_crawl_task_hourly_counts;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS web_crawl_tasks_count_insert ON web_crawl_tasks;
CREATE TRIGGER web_crawl_tasks_count_insert
    AFTER INSERT ON web_crawl_tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tm_count_tasks();
DROP TRIGGER IF EXISTS web_crawl_tasks_count_update ON web_crawl_tasks;
CREATE TRIGGER web_crawl_tasks_count_update
    AFTER UPDATE ON web_crawl_tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tm_count_tasks();
DROP TRIGGER IF EXISTS web_crawl_tasks_count_delete ON web_crawl_tasks;
CREATE TRIGGER web_crawl_tasks_count_delete
    AFTER DELETE ON web_crawl_tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tm_count_tasks();
DROP TRIGGER IF EXISTS web_crawl_tasks_count_truncate ON web_crawl_tasks;
CREATE TRIGGER web_crawl_tasks_count_truncate
    AFTER TRUNCATE ON web_crawl_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tm_count_tasks();

-- The rows already there (a database the original service filled, or an upgrade). The table
-- lock keeps writers out between the count and the triggers taking over.
LOCK TABLE web_crawl_tasks IN SHARE ROW EXCLUSIVE MODE;
DELETE FROM web_crawl_task_hourly_counts;
INSERT INTO web_crawl_task_hourly_counts (hour, status, tasks)
SELECT date_trunc('hour', created_at), status, count(*)
FROM web_crawl_tasks
GROUP BY 1, 2;

-- Same name, arguments and result as before; the same answer (tasks created in the last
-- `hours` hours, by their current status), from the counters for the whole hours of the window
-- and from the (status, created_at, id) index for the part of its first hour.
CREATE OR REPLACE FUNCTION get_web_crawl_metrics(hours integer)
RETURNS TABLE (
    new_tasks_count integer, completed_tasks_count integer, error_tasks_count integer,
    total_tasks_count integer
)
LANGUAGE sql STABLE AS $$
    WITH edge AS (
        SELECT now() - interval '1 hour' * hours AS since,
               date_trunc('hour', now() - interval '1 hour' * hours) + interval '1 hour'
                   AS first_full_hour
    ), counted AS (
        SELECT c.status, c.tasks
        FROM web_crawl_task_hourly_counts c, edge
        WHERE c.hour >= edge.first_full_hour
      UNION ALL
        SELECT t.status, count(*)
        FROM web_crawl_tasks t, edge
        WHERE t.created_at >= edge.since AND t.created_at < edge.first_full_hour
        GROUP BY t.status
    ), totals AS (
        SELECT COALESCE(sum(tasks) FILTER (WHERE status = 'new'), 0)::integer AS n,
               COALESCE(sum(tasks) FILTER (WHERE status = 'completed'), 0)::integer AS c,
               COALESCE(sum(tasks) FILTER (WHERE status = 'error'), 0)::integer AS e
        FROM counted
    )
    SELECT n, c, e, n + c + e FROM totals
$$;
