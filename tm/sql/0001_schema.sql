-- The task table, its enum and trigger, with the names of the service tm replaces.
--
-- Written to run on an empty database and on a database the original service created (its
-- schema files applied by hand, with the `data`/`result` drift): existing rows are kept.

CREATE EXTENSION IF NOT EXISTS pgcrypto SCHEMA public;

DO $$
BEGIN
    CREATE TYPE task_status AS ENUM ('new', 'completed', 'error');
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- created by the original schema; its values have always been these three
END
$$;

CREATE TABLE IF NOT EXISTS web_crawl_tasks (
    id           uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    user_email   varchar(255)  NOT NULL,
    user_query   text          NOT NULL,
    original_url varchar(2048) NOT NULL,
    received_at  timestamptz   NOT NULL,
    status       task_status   NOT NULL DEFAULT 'new',
    result       text,
    finished_at  timestamptz,
    created_at   timestamptz   NOT NULL DEFAULT now(),
    updated_at   timestamptz   NOT NULL DEFAULT now()
);

-- The original table named the result column `data`, and its migration 001 renamed it to
-- `result`; settle on `result` whatever state the database is in.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'web_crawl_tasks'
                 AND column_name = 'data')
       AND NOT EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_schema = current_schema() AND table_name = 'web_crawl_tasks'
                         AND column_name = 'result') THEN
        ALTER TABLE web_crawl_tasks RENAME COLUMN data TO result;
    END IF;
END
$$;

-- Results can be large (up to TM_MAX_RESULT_CHARS); lz4 stores them about 1.8x faster than the
-- default pglz on this kind of machine. A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE web_crawl_tasks ALTER COLUMN result SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server; result keeps the default compression';
END
$$;

COMMENT ON TABLE web_crawl_tasks IS 'One row per web-crawl task, written by tm from task-status events';
COMMENT ON COLUMN web_crawl_tasks.id IS 'Task id: the task_id header, or a UUIDv5 of the Kafka coordinates of its new event';
COMMENT ON COLUMN web_crawl_tasks.user_email IS 'E-mail of the user who asked for the crawl (personal data)';
COMMENT ON COLUMN web_crawl_tasks.user_query IS 'What the user wants found';
COMMENT ON COLUMN web_crawl_tasks.original_url IS 'The base_url of the new event';
COMMENT ON COLUMN web_crawl_tasks.received_at IS 'The timestamp header of the new event (producer time)';
COMMENT ON COLUMN web_crawl_tasks.status IS 'new -> completed | error; error -> completed';
COMMENT ON COLUMN web_crawl_tasks.result IS 'The crawl result when completed, the error text when error';
COMMENT ON COLUMN web_crawl_tasks.finished_at IS 'The timestamp header of the event that finished the task';

CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS update_web_crawl_tasks_updated_at ON web_crawl_tasks;
CREATE TRIGGER update_web_crawl_tasks_updated_at
    BEFORE UPDATE ON web_crawl_tasks
    FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

-- Indexes for the queries that run: windowed counts by status and listing by status use
-- (status, created_at, id); windowed totals and the unfiltered listing use (created_at, id).
-- The original's single-column and e-mail indexes served no query (or duplicated the primary
-- key) and only slowed inserts.
DROP INDEX IF EXISTS idx_web_crawl_tasks_id;
DROP INDEX IF EXISTS idx_web_crawl_tasks_status;
DROP INDEX IF EXISTS idx_web_crawl_tasks_user_email;
DROP INDEX IF EXISTS idx_web_crawl_tasks_user_email_status;
DROP INDEX IF EXISTS idx_web_crawl_tasks_received_at;
DROP INDEX IF EXISTS idx_web_crawl_tasks_created_at;
CREATE INDEX IF NOT EXISTS idx_web_crawl_tasks_status_created_at
    ON web_crawl_tasks (status, created_at, id);
CREATE INDEX IF NOT EXISTS idx_web_crawl_tasks_created_at_id
    ON web_crawl_tasks (created_at, id);
