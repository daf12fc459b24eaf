-- Dispatch bookkeeping on workflow_states, wsctl's own tables, and the step
-- completion functions. ADD COLUMN with constant or stable defaults does not
-- rewrite the table (PostgreSQL 11+). Statuses stay free text (no CHECK):
-- PENDING, DISPATCHING (claimed, lease held), DISPATCHED (spawned),
-- COMPLETED, FAILED, BLOCKED (waits for an operator), CANCELLED.

ALTER TABLE public.workflow_states
    ADD COLUMN IF NOT EXISTS attempts          integer     NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS available_at      timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS claim_token       uuid,
    ADD COLUMN IF NOT EXISTS lease_expires_at  timestamptz,
    ADD COLUMN IF NOT EXISTS claimed_by        text,
    ADD COLUMN IF NOT EXISTS modal_call_id     text,
    ADD COLUMN IF NOT EXISTS last_error        text,
    ADD COLUMN IF NOT EXISTS dispatched_at     timestamptz,
    ADD COLUMN IF NOT EXISTS completed_at      timestamptz,
    -- an async step's sender call was seen to return: nothing left to poll, the receiver completes it
    ADD COLUMN IF NOT EXISTS sender_returned_at timestamptz;

-- `wsctl batch create --dedupe-key`: a retried create returns the first batch.
CREATE TABLE IF NOT EXISTS wsctl.batch_dedupe_keys (
    dedupe_key  text PRIMARY KEY,
    batch_id    uuid NOT NULL REFERENCES public.batches (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- `wsctl backfill workstream-slug`: where an interrupted walk stopped.
CREATE TABLE IF NOT EXISTS wsctl.backfill_progress (
    job         text PRIMARY KEY,
    last_id     uuid,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON wsctl.batch_dedupe_keys, wsctl.backfill_progress FROM PUBLIC;

-- Complete many states at once (the dispatcher's path) and enqueue each
-- item's next blueprint step as PENDING. Idempotent: completing a completed
-- state, or enqueuing a step that exists, does nothing. A batch whose items
-- have all completed their last step becomes COMPLETED. Returns the number of
-- states this call completed. With expected_token, only states still
-- claimed with that token are completed (a stale claim never overwrites).
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
            last_error = NULL
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

CREATE OR REPLACE FUNCTION wsctl.complete_step(state_id uuid)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, public
AS $$ SELECT wsctl.complete_steps(ARRAY[state_id]) > 0 $$;

-- Mark one state FAILED with its reason (a COMPLETED or CANCELLED state is left alone).
CREATE OR REPLACE FUNCTION wsctl.fail_step(state_id uuid, error text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, public
AS $$
    WITH f AS (
        UPDATE public.workflow_states
        SET status = 'FAILED', last_error = error, updated_at = now(),
            claim_token = NULL, lease_expires_at = NULL
        WHERE id = state_id AND status NOT IN ('COMPLETED', 'CANCELLED')
        RETURNING 1
    )
    SELECT count(*) > 0 FROM f
$$;

-- On Supabase a function reachable by anon can be called by anyone holding
-- the public key: only roles granted explicitly may execute these.
REVOKE ALL ON FUNCTION wsctl.complete_steps(uuid[], uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION wsctl.complete_step(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION wsctl.fail_step(uuid, text) FROM PUBLIC;
