-- tm_create_tasks, revised (0003 stays as it was applied). Same arguments, same result columns,
-- outcomes still in input order by `ord`; two changes:
--
-- 1. Rows are inserted in id order, whatever the input order. Two workers applying overlapping
--    batches at once (a redelivery after a rebalance) then take the rows' insertion locks in
--    one order: one waits for the other instead of both waiting for each other (40P01). 0003
--    got this order only from the sort of its window function, which nothing promised.
-- 2. A `new` event for a task that is already finished (`completed` or `error`) is `unchanged`,
--    not `duplicate`: the consumer republishes the crawl request of a `duplicate` (the task may
--    have been created by a delivery that never got its request out), and a finished task must
--    not be crawled again. A stored task still `new` stays `duplicate`. Nothing is written.
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
        ORDER BY i.id
        ON CONFLICT (id) DO NOTHING
        RETURNING t.id
    ), stored AS (
        -- The rows that were there before this call (the statement's snapshot does not show
        -- the ones it inserts). Only ids it did not insert are looked up: a batch of fresh
        -- tasks, the common case, costs no second index probe per row.
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
    ORDER BY i.ord
$$;
