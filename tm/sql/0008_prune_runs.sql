-- What each `tm db prune` did, one row a run: the API's /api/metrics reads the last one (a
-- CronJob's pod is gone before Prometheus could scrape it). deleted_rows_total carries the sum
-- over every run so far, so that the total survives the removal of old rows of this table
-- (each run removes the rows older than its own cutoff).

CREATE TABLE IF NOT EXISTS tm_prune_runs (
    id                 bigint           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at         timestamptz      NOT NULL,
    finished_at        timestamptz      NOT NULL,
    cutoff             timestamptz      NOT NULL,
    retention_days     integer          NOT NULL,
    deleted_rows       bigint           NOT NULL,
    batches            integer          NOT NULL,
    duration_s         double precision NOT NULL,
    is_complete        boolean          NOT NULL,  -- false: stopped (a signal) before the cutoff
    deleted_rows_total bigint           NOT NULL
);

COMMENT ON TABLE tm_prune_runs IS
    'One row per tm db prune run (not dry runs); the last one is exposed on /api/metrics';
