-- batch_known_workstreams --
-- A workstream is known when it has registry rows.
SELECT DISTINCT workstream_slug FROM public.enrichment_registry ORDER BY 1;

-- batch_registered_steps --
-- Which of the given steps are registered in the workstream.
SELECT slug FROM public.enrichment_registry
WHERE workstream_slug = %s AND slug = ANY (%s::text[]);

-- batch_configured_steps --
-- Which of the given steps the client has a config for in the workstream.
SELECT workflow_slug FROM public.client_workflow_configs
WHERE client_id = %s AND workstream_slug = %s AND workflow_slug = ANY (%s::text[]);

-- batch_insert --
-- The batch row, carrying its workstream from birth.
INSERT INTO public.batches (id, client_id, blueprint, status, workstream_slug)
VALUES (%s, %s, %s::text[], 'PENDING', %s)
RETURNING created_at;

-- batch_dedupe_claim --
-- Claim a dedupe key in the creating transaction; no row back means another batch holds it
-- (a concurrent create with the same key waits here until the first one commits or rolls back).
INSERT INTO wsctl.batch_dedupe_keys (dedupe_key, batch_id)
VALUES (%s, %s)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING batch_id;

-- batch_dedupe_lookup --
-- The batch a dedupe key names.
SELECT batch_id FROM wsctl.batch_dedupe_keys WHERE dedupe_key = %s;

-- batch_items_copy --
-- Bulk load of the items, streamed from the item file in COPY's binary format
-- (ids made client-side, see batches.py).
COPY public.batch_items (id, batch_id, data) FROM STDIN (FORMAT binary);

-- batch_states_first_step --
-- One PENDING state per item for the first blueprint step. The items just copied have
-- the ids item_prefix || counter for counters 1..items (8 hex digits), so the states are
-- made from the counter alone, without reading batch_items back (the foreign key on
-- item_id still checks each one); each state id shares its item's counter under the
-- batch's state prefix, so the primary key grows at its end.
INSERT INTO public.workflow_states (id, item_id, batch_id, step_name, status)
SELECT (%(state_prefix)s || lpad(to_hex(g), 8, '0'))::uuid,
       (%(item_prefix)s || lpad(to_hex(g), 8, '0'))::uuid,
       %(batch_id)s, %(step)s, 'PENDING'
FROM generate_series(1::bigint, %(items)s::bigint) AS g;

-- batch_get --
-- One batch with its client's name.
SELECT b.id, b.client_id, c.name, b.workstream_slug, b.blueprint, b.status, b.created_at
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE b.id = %s;

-- batch_item_count --
-- Items of one batch (idx_batch_items_batch, migration 0005).
SELECT count(*) FROM public.batch_items WHERE batch_id = %s;

-- batch_state_counts --
-- States of one batch by step and status, whatever free-text status they carry.
SELECT step_name, status, count(*)
FROM public.workflow_states
WHERE batch_id = %s
GROUP BY step_name, status
ORDER BY step_name, status;

-- batch_list --
-- Batches, newest first, optionally by client, by workstream, or only those without one.
SELECT b.id, b.client_id, c.name, b.workstream_slug, b.blueprint, b.status, b.created_at
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE (%(client_id)s::uuid IS NULL OR b.client_id = %(client_id)s::uuid)
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
  AND (NOT %(missing)s::boolean OR b.workstream_slug IS NULL)
ORDER BY b.created_at DESC, b.id
LIMIT %(limit)s;

-- batch_lock --
-- Serialise cancels of one batch.
SELECT status FROM public.batches WHERE id = %s FOR UPDATE;

-- batch_cancel_states --
-- Waiting states never get dispatched: PENDING and BLOCKED become CANCELLED (in-flight ones finish).
UPDATE public.workflow_states
SET status = 'CANCELLED', updated_at = now(), claim_token = NULL, lease_expires_at = NULL
WHERE batch_id = %s AND status IN ('PENDING', 'BLOCKED');

-- batch_cancel --
-- The batch itself; a COMPLETED batch is refused before this runs.
UPDATE public.batches SET status = 'CANCELLED' WHERE id = %s AND status <> 'CANCELLED';

-- batch_in_flight --
-- States a cancel leaves to finish as they will.
SELECT count(*) FROM public.workflow_states
WHERE batch_id = %s AND status IN ('DISPATCHING', 'DISPATCHED');
