-- inspect_item --
-- `wsctl item show`: an item, its batch (status, blueprint, workstream) and the batch's client.
-- The columns are those of item_report.ItemReport.
SELECT bi.id AS item_id, bi.batch_id, b.client_id, c.name AS client,
       b.workstream_slug AS batch_workstream, b.status AS batch_status,
       coalesce(b.blueprint, '{}') AS blueprint, bi.created_at
FROM public.batch_items bi
JOIN public.batches b ON b.id = bi.batch_id
JOIN public.clients c ON c.id = b.client_id
WHERE bi.id = %s;

-- inspect_item_steps --
-- Every step of the item's blueprint in order (NULL state: not reached yet), then any state
-- whose step is not in the blueprint; each with the registry row for (step, batch workstream).
WITH b AS (
    SELECT bt.id, bt.blueprint, bt.workstream_slug
    FROM public.batch_items bi
    JOIN public.batches bt ON bt.id = bi.batch_id
    WHERE bi.id = %(item_id)s
), steps AS (
    SELECT s.step, s.pos
    FROM b, unnest(b.blueprint) WITH ORDINALITY AS s(step, pos)
    UNION ALL
    SELECT ws.step_name, NULL::bigint
    FROM public.workflow_states ws, b
    WHERE ws.item_id = %(item_id)s AND NOT (ws.step_name = ANY (b.blueprint))
)
-- The columns: item_report.StepReport's fields, the registry row's (type, sender, receiver)
-- and the state's timestamps (item_report.TIMESTAMPS).
SELECT steps.pos AS position, steps.step, b.workstream_slug AS workstream, ws.id AS state_id,
       ws.status, ws.attempts, ws.modal_call_id, ws.last_error, ws.claimed_by,
       er.type, er.modal_sender_fn AS sender, er.modal_receiver_fn AS receiver,
       ws.created_at, ws.available_at, ws.dispatched_at, ws.completed_at, ws.updated_at,
       ws.lease_expires_at
FROM steps
CROSS JOIN b
LEFT JOIN public.workflow_states ws
       ON ws.item_id = %(item_id)s AND ws.step_name = steps.step
LEFT JOIN public.enrichment_registry er
       ON er.slug = steps.step AND er.workstream_slug = b.workstream_slug
ORDER BY steps.pos NULLS LAST, ws.created_at, steps.step;

-- doctor_legacy_batches --
-- Batches without a workstream_slug (legacy): how many, how many still active, the oldest few.
SELECT count(*) AS total,
       count(*) FILTER (WHERE status NOT IN ('COMPLETED', 'CANCELLED')) AS active,
       (SELECT coalesce(array_agg(id::text ORDER BY created_at), '{}')
        FROM (SELECT id, created_at FROM public.batches
              WHERE workstream_slug IS NULL
              ORDER BY created_at LIMIT %(top)s) oldest) AS sample
FROM public.batches
WHERE workstream_slug IS NULL;

-- doctor_unregistered_states --
-- PENDING/BLOCKED states whose (step, batch workstream) has no registry row, counted per pair
-- (NULL workstream: a legacy batch); the total of pairs comes with each row.
SELECT ws.step_name, b.workstream_slug, count(*) AS states,
       count(*) OVER () AS pairs
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
WHERE ws.status IN ('PENDING', 'BLOCKED')
  AND NOT EXISTS (
      SELECT 1 FROM public.enrichment_registry er
      WHERE er.slug = ws.step_name AND er.workstream_slug = b.workstream_slug)
GROUP BY ws.step_name, b.workstream_slug
ORDER BY count(*) DESC, ws.step_name, b.workstream_slug NULLS FIRST
LIMIT %(top)s;

-- doctor_missing_configs --
-- Active batches (not COMPLETED/CANCELLED) with a workstream whose client has no config for a
-- (step, workstream) of the blueprint: one row per (client, step, workstream), total with each.
WITH needed AS (
    SELECT DISTINCT b.client_id, s.step, b.workstream_slug, b.id AS batch_id
    FROM public.batches b
    CROSS JOIN LATERAL unnest(b.blueprint) AS s(step)
    WHERE b.status NOT IN ('COMPLETED', 'CANCELLED')
      AND b.workstream_slug IS NOT NULL
)
SELECT c.name, n.step, n.workstream_slug, count(DISTINCT n.batch_id) AS batches,
       count(*) OVER () AS missing
FROM needed n
JOIN public.clients c ON c.id = n.client_id
WHERE NOT EXISTS (
    SELECT 1 FROM public.client_workflow_configs cwc
    WHERE cwc.client_id = n.client_id
      AND cwc.workflow_slug = n.step
      AND cwc.workstream_slug = n.workstream_slug)
GROUP BY c.name, n.step, n.workstream_slug
ORDER BY c.name, n.workstream_slug, n.step
LIMIT %(top)s;

-- doctor_expired_leases --
-- DISPATCHING states whose claim lease has expired (their dispatcher died), and the oldest expiry.
SELECT count(*) AS states, min(lease_expires_at) AS oldest
FROM public.workflow_states
WHERE status = 'DISPATCHING' AND lease_expires_at < now();

-- doctor_stale_dispatched --
-- DISPATCHED states older than the callback timeout (by dispatched_at, else updated_at for rows
-- dispatched before wsctl), per (step, workstream); totals (states, undated, pairs) with each row.
WITH stale AS (
    SELECT ws.step_name, b.workstream_slug, ws.dispatched_at,
           coalesce(ws.dispatched_at, ws.updated_at) AS since
    FROM public.workflow_states ws
    JOIN public.batches b ON b.id = ws.batch_id
    WHERE ws.status = 'DISPATCHED'
      AND coalesce(ws.dispatched_at, ws.updated_at) < now() - make_interval(secs => %(timeout)s)
)
SELECT step_name, workstream_slug, count(*) AS states, min(since) AS oldest,
       sum(count(*)) OVER ()::bigint AS total,
       sum(count(*) FILTER (WHERE dispatched_at IS NULL)) OVER ()::bigint AS undated,
       count(*) OVER () AS pairs
FROM stale
GROUP BY step_name, workstream_slug
ORDER BY count(*) DESC, step_name, workstream_slug NULLS FIRST
LIMIT %(top)s;

-- doctor_registry_functions --
-- Every Modal function the registry names (senders and receivers), with where it is used.
SELECT fn, array_agg(DISTINCT slug || ' (' || workstream_slug || ')' ORDER BY slug || ' (' || workstream_slug || ')') AS uses
FROM (
    SELECT modal_sender_fn AS fn, slug, workstream_slug FROM public.enrichment_registry
    UNION ALL
    SELECT modal_receiver_fn, slug, workstream_slug FROM public.enrichment_registry
    WHERE modal_receiver_fn IS NOT NULL
) f
GROUP BY fn
ORDER BY fn;
