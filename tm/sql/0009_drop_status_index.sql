-- tm: outside a transaction
-- The (status, created_at, id) index made every status update write all three indexes (no
-- update could be HOT); 0007 serves its reads without it. Dropped CONCURRENTLY: a plain DROP
-- INDEX would wait for every transaction on the table while making every later one wait behind
-- it.
DROP INDEX CONCURRENTLY IF EXISTS idx_web_crawl_tasks_status_created_at;
