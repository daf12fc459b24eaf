-- wsctl.complete_steps' batch-completion check ("every item completed its
-- last step") no longer reads the whole of batch_items. In 0003/0008 it was a
-- NOT EXISTS over the batch's items, which the planner turns into an anti
-- join of batches against batch_items; plpgsql's generic plan made that a
-- Hash Anti Join fed by a Seq Scan of every item of the table, once per batch
-- finishing in a call (0.2-0.7 s with 500,000 history items; it grows with
-- the table). A subquery fenced with OFFSET 0 (dropped migration 0015)
-- misplanned on a fresh table with stale statistics (25 s for 20,000 items).
-- Now the check compares two counts of the one batch, each a single-table
-- scan (no join for the planner to choose), run only after the cheap probe
-- finds nothing waiting: the worst a wrong estimate can do is one sequential
-- scan of a table for a finishing batch, never a loop over its items per item
-- (0.4-0.5 ms for a 1,000-item batch with 0, 2,000,000 and 10,000,000 history
-- states; 0008's check took 64 ms, 199 ms and 8 ms: bench_history --explain).
--
-- Same meaning: the count of a batch's COMPLETED states of its last step
-- equals the count of its items exactly when every item has one, as each
-- item has at most one state per step (UNIQUE (item_id, step_name)) and a
-- state carries its item's batch_id (batch create writes both, complete_steps
-- copies the completed state's batch_id into the next step's; the cheap probe
-- above has always counted a batch's states by workflow_states.batch_id; a
-- state whose batch_id differed from its item's, which only a writer outside
-- wsctl could make, would now count for the batch it names). An item without
-- states, or whose last state is in a status the dashboard invented, still
-- keeps its batch from completing.
--
-- CREATE OR REPLACE keeps the function's owner, grants and settings; no data
-- is touched, so a database that already holds data is adopted as it is.
CREATE OR REPLACE FUNCTION wsctl.complete_steps(state_ids uuid[], expected_token uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
DECLARE
    n integer;
    finished_batches uuid[];
BEGIN
    WITH done AS (
        UPDATE public.workflow_states ws
        SET status = 'COMPLETED',
            completed_at = now(),
            updated_at = now(),
            claim_token = NULL,
            lease_expires_at = NULL,
            last_error = NULL,
            -- an earlier attempt's reason no longer describes a completed state
            error_class = NULL,
            reason_code = NULL
        WHERE ws.id = ANY (state_ids)
          AND ws.status NOT IN ('COMPLETED', 'CANCELLED')
          AND (expected_token IS NULL OR ws.claim_token = expected_token)
        RETURNING ws.item_id, ws.batch_id, ws.step_name
    ), nxt AS (
        SELECT d.item_id, d.batch_id,
               b.blueprint[array_position(b.blueprint, d.step_name) + 1] AS next_step,
               array_position(b.blueprint, d.step_name) = cardinality(b.blueprint) AS was_last,
               b.status = 'CANCELLED' AS cancelled
        FROM done d
        JOIN public.batches b ON b.id = d.batch_id
    ), ins AS (
        INSERT INTO public.workflow_states (item_id, batch_id, step_name, status)
        SELECT item_id, batch_id, next_step, 'PENDING'
        FROM nxt
        WHERE next_step IS NOT NULL
          AND NOT cancelled  -- an item in flight when its batch was cancelled goes no further
        ON CONFLICT (item_id, step_name) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer,
           array_agg(DISTINCT batch_id) FILTER (WHERE was_last)
    INTO n, finished_batches
    FROM nxt;

    IF finished_batches IS NOT NULL THEN
        -- Serialize the "all done?" check per batch: without the lock, the
        -- last two items completing in parallel transactions each see the
        -- other as unfinished and the batch stays PENDING forever. In READ
        -- COMMITTED the UPDATE below takes a fresh snapshot after the wait.
        -- NO KEY UPDATE, not UPDATE: it must not conflict with the KEY SHARE
        -- locks that inserting next steps takes on the batch (foreign key),
        -- or two completers of one batch deadlock.
        PERFORM 1 FROM public.batches
        WHERE id = ANY (finished_batches)
        ORDER BY id
        FOR NO KEY UPDATE;
        -- A cheap probe first (an index scan on (batch_id, status) that stops
        -- at the first row): a state still waiting or failed means the batch
        -- is not done. Only then (CASE fixes the order) the full check that
        -- every item completed its last step, which also catches statuses the
        -- dashboard invented, as two counts of the one batch: its items
        -- (idx_batch_items_batch) and its COMPLETED states of the last
        -- blueprint step (a range of idx_workflow_states_batch_status).
        -- Sublinks inside an expression are never turned into joins: each
        -- subquery runs for one batch id, whatever the statistics say.
        UPDATE public.batches b
        SET status = 'COMPLETED'
        WHERE b.id = ANY (finished_batches)
          AND b.status NOT IN ('COMPLETED', 'CANCELLED')
          AND CASE
                WHEN EXISTS (
                    SELECT 1 FROM public.workflow_states s
                    WHERE s.batch_id = b.id
                      AND s.status IN ('PENDING', 'DISPATCHING', 'DISPATCHED', 'BLOCKED', 'FAILED'))
                THEN false
                ELSE (SELECT count(*) FROM public.batch_items i WHERE i.batch_id = b.id)
                   = (SELECT count(*) FROM public.workflow_states s
                      WHERE s.batch_id = b.id
                        AND s.status = 'COMPLETED'
                        AND s.step_name = b.blueprint[cardinality(b.blueprint)])
              END;
    END IF;
    RETURN n;
END
$$;
