-- ui_batches --
-- The dashboard's batches: unfinished ones first, then the newest, per workstream and client.
SELECT b.id, b.workstream_slug AS workstream, c.name AS client, b.status, b.created_at,
       b.blueprint
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE %(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text
ORDER BY b.status IN ('COMPLETED', 'CANCELLED'), b.created_at DESC, b.id
LIMIT %(limit)s;

-- ui_batch_step_counts --
-- States per (batch, step, status) of the shown batches (idx_workflow_states_batch_status);
-- a batch's items are its first step's states (batch create makes one per item).
SELECT ws.batch_id, ws.step_name AS step, ws.status, count(*)::bigint AS states
FROM public.workflow_states ws
WHERE ws.batch_id = ANY (%(batch_ids)s::uuid[])
GROUP BY ws.batch_id, ws.step_name, ws.status;

-- ui_batch --
-- One batch for its page (NULL: no such batch).
SELECT b.id, b.workstream_slug AS workstream, c.name AS client, b.status, b.created_at,
       b.blueprint
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE b.id = %(batch_id)s;

-- ui_reasons --
-- BLOCKED and FAILED states per (batch, step, status, reason code) with the newest item of each
-- group, for the fix commands (idx_workflow_states_needs_operator).
SELECT ws.batch_id, b.workstream_slug AS workstream, c.name AS client, ws.step_name AS step,
       ws.status, ws.reason_code AS reason, ws.error_class, count(*)::bigint AS states,
       (array_agg(ws.item_id ORDER BY ws.updated_at DESC))[1] AS sample_item_id,
       max(ws.updated_at) AS newest_at
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
JOIN public.clients c ON c.id = b.client_id
WHERE ws.status IN ('BLOCKED', 'FAILED')
  AND (%(batch_id)s::uuid IS NULL OR ws.batch_id = %(batch_id)s::uuid)
GROUP BY ws.batch_id, b.workstream_slug, c.name, ws.step_name, ws.status, ws.reason_code,
         ws.error_class
ORDER BY count(*) DESC, ws.batch_id, ws.step_name, ws.status, ws.reason_code
LIMIT %(limit)s;

-- ui_batch_items --
-- A page of a batch's items with where each stands: its latest state (step, status).
SELECT bi.id AS item_id, last.step_name AS step, last.status, last.reason_code AS reason,
       last.updated_at
FROM public.batch_items bi
LEFT JOIN LATERAL (
    SELECT ws.step_name, ws.status, ws.reason_code, ws.updated_at
    FROM public.workflow_states ws
    WHERE ws.item_id = bi.id
    ORDER BY ws.created_at DESC, ws.updated_at DESC
    LIMIT 1
) last ON true
WHERE bi.batch_id = %(batch_id)s
ORDER BY bi.id
LIMIT %(limit)s;

-- ui_find_id --
-- Search: is the id an item's or a batch's?
SELECT EXISTS (SELECT 1 FROM public.batch_items WHERE id = %(id)s) AS item,
       EXISTS (SELECT 1 FROM public.batches WHERE id = %(id)s) AS batch;

-- ui_pruned_summaries --
-- The summary rows of the shown batches that `wsctl prune` pruned: their counts stand in for the
-- states that are gone (as `batch status` answers).
SELECT batch_id, finished_at, counts, items, states_pruned, items_pruned, include_items,
       archive, started_at, states_pruned_at, items_pruned_at
FROM wsctl.pruned_batches
WHERE batch_id = ANY (%(batch_ids)s::uuid[]);
