-- dispatch_claim --
-- Claim due states in ONE statement: expired leases first, then due PENDING rows, oldest
-- available_at first, each through its partial index with FOR UPDATE SKIP LOCKED inside a
-- MATERIALIZED CTE (so never more rows than the limit), flipped to DISPATCHING with this
-- claim's token and lease; the batch's workstream and the registry row for
-- (step_name, workstream_slug) come back with each row (NULL when there is none).
-- {scope} is empty, or dispatch_claim_scope_workstream for --workstream (composed with
-- psycopg.sql, so each variant plans on its own and the filter is a plain semi-join).
WITH expired AS MATERIALIZED (
    SELECT ws.id
    FROM public.workflow_states ws
    WHERE ws.status = 'DISPATCHING'
      AND ws.lease_expires_at < now()
      {scope}
    ORDER BY ws.lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE OF ws SKIP LOCKED
), pending AS MATERIALIZED (
    SELECT ws.id
    FROM public.workflow_states ws
    WHERE ws.status = 'PENDING'
      AND ws.available_at <= now()
      {scope}
    ORDER BY ws.available_at
    LIMIT greatest(%(limit)s - (SELECT count(*) FROM expired), 0)
    FOR UPDATE OF ws SKIP LOCKED
), claimed AS (
    UPDATE public.workflow_states ws
    {flip}
    WHERE ws.id IN (SELECT id FROM expired UNION ALL SELECT id FROM pending)
    RETURNING ws.id, ws.item_id, ws.batch_id, ws.step_name, ws.attempts,
              ws.dispatch_generation, ws.id IN (SELECT id FROM expired) AS reclaimed
)
{rows};

-- dispatch_claim_flip --
-- The claim's transition, one text for dispatch_claim and dispatch_claim_admitted (composed in
-- as {flip}): DISPATCHING under this claim's token and lease.
SET status = 'DISPATCHING',
    claim_token = %(token)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    claimed_by = %(claimed_by)s,
    -- a lease that expired means its dispatcher died mid-run: that counts
    -- as an attempt, so an item that kills its dispatcher ends FAILED
    attempts = ws.attempts + (ws.status = 'DISPATCHING')::int,
    -- the dispatch generation: every claim increments it, nothing resets it
    dispatch_generation = ws.dispatch_generation + 1,
    updated_at = now()

-- dispatch_claim_rows --
-- What a claim returns ({rows}): the claimed rows with the batch's workstream and the registry
-- row for (step_name, workstream_slug), NULL when there is none (engine.ClaimRow).
SELECT c.id, c.item_id, c.batch_id, c.step_name, c.attempts, c.dispatch_generation,
       b.workstream_slug, er.type, er.modal_sender_fn, er.modal_receiver_fn,
       b.status = 'CANCELLED' AS batch_cancelled, c.reclaimed
FROM claimed c
JOIN public.batches b ON b.id = c.batch_id
LEFT JOIN public.enrichment_registry er
       ON er.slug = c.step_name AND er.workstream_slug = b.workstream_slug

-- dispatch_claim_scope_workstream --
-- The --workstream filter of dispatch_claim: only states of batches in that workstream.
AND ws.batch_id IN (SELECT b.id FROM public.batches b WHERE b.workstream_slug = %(workstream)s::text)

-- dispatch_plan --
-- --dry-run: what a pass would claim, resolved the same way, without locking or writing
-- (the columns of dispatch_claim, read into the same dataclass by name).
SELECT ws.id, ws.item_id, ws.batch_id, ws.step_name, ws.attempts, ws.dispatch_generation,
       b.workstream_slug, er.type, er.modal_sender_fn, er.modal_receiver_fn,
       b.status = 'CANCELLED' AS batch_cancelled, ws.status = 'DISPATCHING' AS reclaimed
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
LEFT JOIN public.enrichment_registry er
       ON er.slug = ws.step_name AND er.workstream_slug = b.workstream_slug
WHERE ((ws.status = 'PENDING' AND ws.available_at <= now())
       OR (ws.status = 'DISPATCHING' AND ws.lease_expires_at < now()))
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
ORDER BY ws.available_at
LIMIT %(limit)s;

-- dispatch_plan_due_total --
-- --dry-run: how many states are due in all (the plan shows the first --limit of them).
SELECT count(*) AS due
FROM public.workflow_states ws
WHERE ((ws.status = 'PENDING' AND ws.available_at <= now())
       OR (ws.status = 'DISPATCHING' AND ws.lease_expires_at < now()))
  AND (%(workstream)s::text IS NULL
       OR ws.batch_id IN (SELECT b.id FROM public.batches b
                          WHERE b.workstream_slug = %(workstream)s::text));

-- dispatch_complete_claimed --
-- Sync steps whose function returned: COMPLETED and next step enqueued, guarded by the claim token.
SELECT wsctl.complete_steps(%s::uuid[], %s::uuid) AS completed;

-- dispatch_mark_dispatched --
-- Spawned (or async sender returned): DISPATCHED with its call id, guarded by the claim token.
UPDATE public.workflow_states ws
SET status = 'DISPATCHED',
    modal_call_id = u.call_id,
    dispatched_at = now(),
    sender_returned_at = NULL,
    lease_expires_at = NULL,
    last_error = NULL,
    error_class = NULL,
    reason_code = NULL,
    updated_at = now()
FROM unnest(%s::uuid[], %s::text[]) AS u(id, call_id)
WHERE ws.id = u.id AND ws.claim_token = %s::uuid AND ws.status = 'DISPATCHING'
RETURNING ws.id;

-- dispatch_retry --
-- Transient failures: back to PENDING after a backoff, or FAILED once attempts reach the
-- maximum (a reason that does not count an attempt, such as a full Modal queue, never fails). One statement for both writers, only the guard differs: a pass passes its claim
-- %(token)s (the row must still be DISPATCHING under it); reconciliation passes a NULL token
-- and each row's polled call id (the row must still be DISPATCHED with that call: another
-- dispatcher may have moved on since).
UPDATE public.workflow_states ws
SET status = CASE WHEN ws.attempts + u.counted::int >= %(max_attempts)s THEN 'FAILED'
                  ELSE 'PENDING' END,
    attempts = ws.attempts + u.counted::int,
    available_at = now() + make_interval(secs => u.delay),
    last_error = u.error,
    error_class = u.error_class,
    reason_code = u.reason_code,
    claim_token = NULL,
    lease_expires_at = NULL,
    modal_call_id = NULL,
    updated_at = now()
FROM unnest(%(ids)s::uuid[], %(calls)s::text[], %(errors)s::text[], %(classes)s::text[],
            %(codes)s::text[], %(delays)s::float8[], %(counted)s::bool[])
     AS u(id, call_id, error, error_class, reason_code, delay, counted)
WHERE ws.id = u.id
  AND CASE WHEN %(token)s::uuid IS NULL
           THEN ws.status = 'DISPATCHED' AND ws.modal_call_id = u.call_id
           ELSE ws.status = 'DISPATCHING' AND ws.claim_token = %(token)s::uuid END
RETURNING ws.id, ws.status;

-- dispatch_finish_claimed --
-- Claimed states that end without running: BLOCKED (needs an operator: no workstream, no
-- registry row, function not found ...), FAILED (permanent, or its expired leases used up its
-- attempts) or CANCELLED (its batch was cancelled meanwhile), with the reason, its class and
-- code (NULL for CANCELLED); guarded by the claim token. %(status)s is one of the three.
UPDATE public.workflow_states ws
SET status = %(status)s::text,
    last_error = u.reason,
    error_class = u.error_class,
    reason_code = u.reason_code,
    claim_token = NULL,
    lease_expires_at = NULL,
    updated_at = now()
FROM unnest(%(ids)s::uuid[], %(reasons)s::text[], %(classes)s::text[], %(codes)s::text[])
     AS u(id, reason, error_class, reason_code)
WHERE ws.id = u.id AND ws.claim_token = %(token)s::uuid AND ws.status = 'DISPATCHING'
RETURNING ws.id;

-- dispatch_renew_lease --
-- While a chunk runs longer than a third of its lease, its claims are renewed.
UPDATE public.workflow_states
SET lease_expires_at = now() + make_interval(secs => %s)
WHERE claim_token = %s::uuid AND status = 'DISPATCHING';

-- dispatch_release --
-- A pass stopped for an environment error: unspawned claims go back to PENDING untouched.
UPDATE public.workflow_states ws
SET status = 'PENDING',
    claim_token = NULL,
    lease_expires_at = NULL,
    claimed_by = NULL,
    updated_at = now()
WHERE ws.id = ANY (%s::uuid[]) AND ws.claim_token = %s::uuid AND ws.status = 'DISPATCHING';

-- dispatch_reconcile_candidates --
-- DISPATCHED sync steps with a Modal call id, and async senders whose call has not returned,
-- least recently polled first (never polled first, then oldest), bounded per pass: however
-- many long-running calls are older, every call is polled in turn.
SELECT ws.id, ws.item_id, ws.step_name, ws.modal_call_id, ws.attempts, er.type
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
LEFT JOIN public.enrichment_registry er
       ON er.slug = ws.step_name AND er.workstream_slug = b.workstream_slug
WHERE ws.status = 'DISPATCHED' AND ws.modal_call_id IS NOT NULL
  AND ws.sender_returned_at IS NULL
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
ORDER BY ws.last_polled_at NULLS FIRST, ws.dispatched_at
LIMIT %(limit)s;

-- dispatch_mark_polled --
-- The polled states' calls were asked now (reconciliation polls the least recently polled first).
UPDATE public.workflow_states
SET last_polled_at = now()
WHERE id = ANY (%s::uuid[]) AND status = 'DISPATCHED';

-- dispatch_sender_returned --
-- An async step's sender call returned: stop polling it; its receiver completes the step.
UPDATE public.workflow_states ws
SET sender_returned_at = now()
FROM unnest(%s::uuid[], %s::text[]) AS u(id, call_id)
WHERE ws.id = u.id AND ws.modal_call_id = u.call_id AND ws.status = 'DISPATCHED';

-- dispatch_reconcile_complete --
-- A polled sync call returned: complete the DISPATCHED state (idempotent if the function did).
SELECT wsctl.complete_steps(ARRAY(
    SELECT ws.id
    FROM public.workflow_states ws
    JOIN unnest(%s::uuid[], %s::text[]) AS u(id, call_id)
      ON ws.id = u.id AND ws.modal_call_id = u.call_id
    WHERE ws.status = 'DISPATCHED')) AS completed;

-- dispatch_callback_timeout_candidates --
-- DISPATCHED longer than the callback timeout (bounded per pass): before they are failed,
-- the calls of sync steps are checked (one that returned is completed instead).
SELECT s.id, s.item_id, s.modal_call_id, er.type
FROM public.workflow_states s
JOIN public.batches b ON b.id = s.batch_id
LEFT JOIN public.enrichment_registry er
       ON er.slug = s.step_name AND er.workstream_slug = b.workstream_slug
WHERE s.status = 'DISPATCHED'
  -- rows DISPATCHED before wsctl have no dispatched_at: their last update stands in
  AND coalesce(s.dispatched_at, s.updated_at) < now() - make_interval(secs => %(timeout)s)
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
ORDER BY coalesce(s.dispatched_at, s.updated_at)
LIMIT %(limit)s;

-- dispatch_callback_timeouts --
-- The candidates still DISPATCHED and past the timeout: FAILED (class permanent, reason
-- callback_timeout), skipping rows another session holds.
WITH due AS MATERIALIZED (
    SELECT s.id
    FROM public.workflow_states s
    WHERE s.id = ANY (%(ids)s::uuid[])
      AND s.status = 'DISPATCHED'
      AND coalesce(s.dispatched_at, s.updated_at) < now() - make_interval(secs => %(timeout)s)
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE public.workflow_states ws
SET status = 'FAILED',
    last_error = format('no completion within the callback timeout of %%s s (dispatched %%s)',
                        %(timeout)s, coalesce(ws.dispatched_at, ws.updated_at)),
    error_class = 'permanent',
    reason_code = 'callback_timeout',
    updated_at = now()
WHERE ws.id IN (SELECT id FROM due) AND ws.status = 'DISPATCHED'
RETURNING ws.id, ws.item_id, ws.last_error;

-- dispatch_retry_states --
-- `wsctl retry`: an operator fixed the cause; BLOCKED/FAILED states of a batch go back to PENDING.
UPDATE public.workflow_states ws
SET status = 'PENDING',
    attempts = 0,
    available_at = now(),
    claim_token = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE ws.batch_id = %(batch_id)s
  AND ws.status = ANY (%(statuses)s::text[])
  AND (%(step)s::text IS NULL OR ws.step_name = %(step)s::text)
RETURNING ws.id;

-- dispatch_batch_status --
-- `wsctl retry` refuses an unknown or cancelled batch.
SELECT status FROM public.batches WHERE id = %s;

-- dispatch_journal_fence --
-- Replaying a journaled chunk: the states still waiting under that claim, at the journaled
-- dispatch generation (a later claim has moved the generation on: its entry is skipped).
SELECT ws.id
FROM public.workflow_states ws
JOIN unnest(%s::uuid[], %s::bigint[]) AS u(id, generation)
  ON ws.id = u.id AND ws.dispatch_generation = u.generation
WHERE ws.status = 'DISPATCHING' AND ws.claim_token = %s::uuid
FOR UPDATE OF ws;

-- dispatch_reconcile_finish --
-- A polled call raised an operator error (BLOCKED) or a permanent one (FAILED): ended at once
-- with the reason, guarded by the polled call id like dispatch_retry's reconcile guard.
UPDATE public.workflow_states ws
SET status = %(status)s::text,
    last_error = u.reason,
    error_class = u.error_class,
    reason_code = u.reason_code,
    modal_call_id = NULL,
    updated_at = now()
FROM unnest(%(ids)s::uuid[], %(calls)s::text[], %(reasons)s::text[], %(classes)s::text[],
            %(codes)s::text[]) AS u(id, call_id, reason, error_class, reason_code)
WHERE ws.id = u.id AND ws.modal_call_id = u.call_id AND ws.status = 'DISPATCHED'
RETURNING ws.id;

-- dispatch_worker_current --
-- wsctl.worker.current_dispatch: the item-step's state and dispatch generation while it is
-- DISPATCHING (the claim a running function belongs to).
SELECT ws.id AS state_id, ws.dispatch_generation, ws.status
FROM public.workflow_states ws
WHERE ws.item_id = %s AND ws.step_name = %s AND ws.status = 'DISPATCHING';

-- dispatch_limits_bound --
-- Whether any registry row is bound to a limit key (a pass claims through the limits only then,
-- or when its backend caps calls per function).
SELECT EXISTS (SELECT 1 FROM wsctl.registry_limit_keys) AS bound;

-- dispatch_claim_candidates --
-- The claim under limits, first step: due states locked (expired leases first, then due
-- PENDING rows, oldest first, SKIP LOCKED, as dispatch_claim), nothing written yet; the
-- pass then decides which the limits admit (dispatch_claim_admitted), and the others stay
-- as they are, their locks released at commit. {scope} as in dispatch_claim; {skip} is
-- empty or dispatch_claim_skip_groups.
WITH expired AS MATERIALIZED (
    SELECT ws.id, ws.batch_id, ws.step_name, ws.lease_expires_at AS due_at
    FROM public.workflow_states ws
    WHERE ws.status = 'DISPATCHING'
      AND ws.lease_expires_at < now()
      {scope}
      {skip}
    ORDER BY ws.lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE OF ws SKIP LOCKED
), pending AS MATERIALIZED (
    SELECT ws.id, ws.batch_id, ws.step_name, ws.available_at AS due_at
    FROM public.workflow_states ws
    WHERE ws.status = 'PENDING'
      AND ws.available_at <= now()
      {scope}
      {skip}
    ORDER BY ws.available_at
    LIMIT greatest(%(limit)s - (SELECT count(*) FROM expired), 0)
    FOR UPDATE OF ws SKIP LOCKED
)
SELECT id, batch_id, step_name, reclaimed
FROM (SELECT e.id, e.batch_id, e.step_name, true AS reclaimed, 0 AS part, e.due_at FROM expired e
      UNION ALL
      SELECT p.id, p.batch_id, p.step_name, false, 1, p.due_at FROM pending p) c
ORDER BY part, due_at;

-- dispatch_claim_skip_groups --
-- The {skip} filter of dispatch_claim_candidates: not the (batch, step) groups whose limits
-- are used up for now (the pass looks past them for other due work).
AND NOT EXISTS (SELECT 1 FROM unnest(%(skip_batches)s::uuid[], %(skip_steps)s::text[]) AS s(batch_id, step_name)
                WHERE s.batch_id = ws.batch_id AND s.step_name = ws.step_name)

-- dispatch_limit_groups --
-- The limit keys of each (batch, step) (wsctl.limit_keys_of) and the step's function there.
SELECT g.batch_id, g.step_name, er.modal_sender_fn AS function,
       wsctl.limit_keys_of(g.batch_id, g.step_name) AS keys
FROM unnest(%(batches)s::uuid[], %(steps)s::text[]) AS g(batch_id, step_name)
LEFT JOIN public.batches b ON b.id = g.batch_id
LEFT JOIN public.enrichment_registry er
       ON er.slug = g.step_name AND er.workstream_slug = b.workstream_slug;

-- dispatch_limits_lock --
-- Lock the limits a claim draws from, in key order (every claimer and worker locks them in
-- the same order: no deadlock); the claims under one key are serialized fleet-wide here.
SELECT key FROM wsctl.limits WHERE key = ANY (%(keys)s::text[]) ORDER BY key FOR UPDATE;

-- dispatch_limits_buckets --
-- The locked limits as they stand (read after the lock, so after the last holder's commit),
-- with the database's clock: both buckets are refilled from it.
SELECT key, rate_per_second, burst, max_in_flight, tokens, refilled_at,
       call_tokens, call_refilled_at, clock_timestamp() AS now
FROM wsctl.limits
WHERE key = ANY (%(keys)s::text[]);

-- dispatch_limits_in_flight --
-- States in flight per key, over every (batch, step) with one in flight: claimed with a live
-- lease, or DISPATCHED and not finished (`in_flight`, until its callback for an async step);
-- and of those, the calls still at Modal (`at_modal`: claimed, or DISPATCHED before its call
-- returned). Keys `modal:FUNCTION` are the backend's cap per function.
WITH f AS (
    SELECT ws.batch_id, ws.step_name, count(*) AS n,
           count(*) FILTER (WHERE ws.status = 'DISPATCHING' OR ws.sender_returned_at IS NULL)
               AS at_modal
    FROM public.workflow_states ws
    WHERE (ws.status = 'DISPATCHING' AND ws.lease_expires_at > now())
       OR ws.status = 'DISPATCHED'
    GROUP BY ws.batch_id, ws.step_name
), keyed AS (
    SELECT k.key, f.n, f.at_modal
    FROM f
    LEFT JOIN public.batches b ON b.id = f.batch_id
    LEFT JOIN public.enrichment_registry er
           ON er.slug = f.step_name AND er.workstream_slug = b.workstream_slug
    CROSS JOIN LATERAL unnest(wsctl.limit_keys_of(f.batch_id, f.step_name)
                              || ('modal:' || er.modal_sender_fn)) AS k(key)
)
SELECT key, sum(n)::bigint AS in_flight, sum(at_modal)::bigint AS at_modal
FROM keyed
WHERE key = ANY (%(keys)s::text[])
GROUP BY key;

-- dispatch_limits_take --
-- What a claim took from the buckets (or a worker from the point-of-call buckets): the
-- tokens left, refilled as of the clock read with them.
UPDATE wsctl.limits l
SET tokens = CASE WHEN %(call)s THEN l.tokens ELSE u.tokens END,
    refilled_at = CASE WHEN %(call)s THEN l.refilled_at ELSE u.at END,
    call_tokens = CASE WHEN %(call)s THEN u.tokens ELSE l.call_tokens END,
    call_refilled_at = CASE WHEN %(call)s THEN u.at ELSE l.call_refilled_at END
FROM unnest(%(keys)s::text[], %(tokens)s::float8[], %(ats)s::timestamptz[]) AS u(key, tokens, at)
WHERE l.key = u.key;

-- dispatch_claim_admitted --
-- The claim under limits, last step: the admitted candidates (still locked by this
-- transaction) flipped to DISPATCHING by the same {flip} as dispatch_claim; %(reclaimed)s are
-- those whose lease had expired.
WITH claimed AS (
    UPDATE public.workflow_states ws
    {flip}
    WHERE ws.id = ANY (%(ids)s::uuid[])
      AND (ws.status = 'PENDING' OR (ws.status = 'DISPATCHING' AND ws.lease_expires_at < now()))
    RETURNING ws.id, ws.item_id, ws.batch_id, ws.step_name, ws.attempts,
              ws.dispatch_generation, ws.id = ANY (%(reclaimed)s::uuid[]) AS reclaimed
)
{rows};
