-- A completed state keeps no reason of an earlier failed attempt: complete_steps (0003)
-- now also clears error_class and reason_code (0006), as it clears last_error.
-- CREATE OR REPLACE keeps the function's owner and grants; nothing else changes.
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
        -- A cheap probe first (index scans on (batch_id, status) that stop at
        -- the first row): a state still waiting or failed means the batch is
        -- not done. Only then the full check that every item completed its
        -- last step (which also catches statuses the dashboard invented).
        UPDATE public.batches b
        SET status = 'COMPLETED'
        WHERE b.id = ANY (finished_batches)
          AND b.status NOT IN ('COMPLETED', 'CANCELLED')
          AND NOT EXISTS (
              SELECT 1 FROM public.workflow_states s
              WHERE s.batch_id = b.id
                AND s.status IN ('PENDING', 'DISPATCHING', 'DISPATCHED', 'BLOCKED', 'FAILED'))
          AND NOT EXISTS (
              SELECT 1
              FROM public.batch_items i
              WHERE i.batch_id = b.id
                AND NOT EXISTS (
                    SELECT 1 FROM public.workflow_states s
                    WHERE s.item_id = i.id
                      AND s.step_name = b.blueprint[cardinality(b.blueprint)]
                      AND s.status = 'COMPLETED'
                )
          );
    END IF;
    RETURN n;
END
$$;
