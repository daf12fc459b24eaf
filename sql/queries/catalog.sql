-- catalog_client_insert --
-- Add a client; an existing name is left alone (no row returned).
INSERT INTO public.clients (name) VALUES (%s)
ON CONFLICT (name) DO NOTHING
RETURNING id, name, created_at;

-- catalog_client_get --
-- One client by exact name, with its creation time.
SELECT id, name, created_at FROM public.clients WHERE name = %s;

-- catalog_client_list --
-- Every client with how many configs and batches it has.
SELECT c.id, c.name, c.created_at,
       (SELECT count(*) FROM public.client_workflow_configs cwc WHERE cwc.client_id = c.id) AS configs,
       (SELECT count(*) FROM public.batches b WHERE b.client_id = c.id) AS batches
FROM public.clients c
ORDER BY c.name;

-- catalog_registry_get_for_update --
-- One registry row by its composite key, locked for the rest of the transaction.
SELECT id, slug AS step, workstream_slug AS workstream, type, modal_sender_fn AS sender,
       modal_receiver_fn AS receiver, created_at
FROM public.enrichment_registry
WHERE slug = %s AND workstream_slug = %s
FOR UPDATE;

-- catalog_registry_upsert --
-- Register (or re-register) the Modal functions of one step in one workstream.
INSERT INTO public.enrichment_registry
    (slug, workstream_slug, type, modal_sender_fn, modal_receiver_fn)
VALUES (%(workflow)s, %(workstream)s, %(type)s, %(sender)s, %(receiver)s)
ON CONFLICT (slug, workstream_slug) DO UPDATE
SET type = EXCLUDED.type,
    modal_sender_fn = EXCLUDED.modal_sender_fn,
    modal_receiver_fn = EXCLUDED.modal_receiver_fn
RETURNING id, slug AS step, workstream_slug AS workstream, type, modal_sender_fn AS sender,
          modal_receiver_fn AS receiver, created_at;

-- catalog_registry_list --
-- Registry rows, optionally for one workstream and/or one step slug.
SELECT id, slug AS step, workstream_slug AS workstream, type, modal_sender_fn AS sender,
       modal_receiver_fn AS receiver, created_at
FROM public.enrichment_registry
WHERE (%(workstream)s::text IS NULL OR workstream_slug = %(workstream)s)
  AND (%(workflow)s::text IS NULL OR slug = %(workflow)s)
ORDER BY workstream_slug, slug;

-- catalog_registry_needed_by --
-- What still needs a registry row: states of that step in batches of that workstream that
-- wait, run or are BLOCKED, and batches not cancelled whose items are still at an earlier
-- step of a blueprint that includes it (they reach it later).
SELECT
    (SELECT count(*)
     FROM public.workflow_states ws
     JOIN public.batches b ON b.id = ws.batch_id
     WHERE ws.step_name = %(workflow)s
       AND b.workstream_slug = %(workstream)s
       AND ws.status IN ('PENDING', 'DISPATCHING', 'DISPATCHED')) AS waiting,
    (SELECT count(*)
     FROM public.workflow_states ws
     JOIN public.batches b ON b.id = ws.batch_id
     WHERE ws.step_name = %(workflow)s
       AND b.workstream_slug = %(workstream)s
       AND ws.status = 'BLOCKED') AS blocked,
    (SELECT count(*)
     FROM public.batches b
     WHERE b.workstream_slug = %(workstream)s
       AND %(workflow)s = ANY (b.blueprint)
       AND b.status <> 'CANCELLED'
       AND EXISTS (
           SELECT 1 FROM public.workflow_states s
           WHERE s.batch_id = b.id
             AND s.status IN ('PENDING', 'DISPATCHING', 'DISPATCHED', 'BLOCKED')
             AND array_position(b.blueprint, s.step_name)
                 < array_position(b.blueprint, %(workflow)s::text))) AS batches_to_reach;

-- catalog_registry_delete --
-- Remove one registry row by id.
DELETE FROM public.enrichment_registry WHERE id = %s;

-- catalog_config_replace --
-- Upsert a client config, replacing the whole document.
INSERT INTO public.client_workflow_configs AS cwc (client_id, workflow_slug, workstream_slug, config)
VALUES (%s, %s, %s, %s)
ON CONFLICT (client_id, workflow_slug, workstream_slug) DO UPDATE
SET config = EXCLUDED.config, updated_at = now()
RETURNING cwc.id, cwc.client_id, cwc.workflow_slug, cwc.workstream_slug, cwc.config, cwc.updated_at;

-- catalog_config_merge --
-- Upsert a client config, merging top-level keys into the existing document.
INSERT INTO public.client_workflow_configs AS cwc (client_id, workflow_slug, workstream_slug, config)
VALUES (%s, %s, %s, %s)
ON CONFLICT (client_id, workflow_slug, workstream_slug) DO UPDATE
SET config = cwc.config || EXCLUDED.config, updated_at = now()
RETURNING cwc.id, cwc.client_id, cwc.workflow_slug, cwc.workstream_slug, cwc.config, cwc.updated_at;

-- catalog_config_get_for_update --
-- One client config by its composite key, locked for the rest of the transaction.
SELECT id, client_id, workflow_slug, workstream_slug, config, updated_at
FROM public.client_workflow_configs
WHERE client_id = %s AND workflow_slug = %s AND workstream_slug = %s
FOR UPDATE;

-- catalog_config_delete --
-- Remove one client config row by id.
DELETE FROM public.client_workflow_configs WHERE id = %s;

-- catalog_config_remove_keys --
-- Drop some top-level keys from one client config.
UPDATE public.client_workflow_configs
SET config = config - %s::text[], updated_at = now()
WHERE id = %s
RETURNING id, client_id, workflow_slug, workstream_slug, config, updated_at;

-- catalog_config_list --
-- Client configs with their client's name, optionally filtered by client, workstream and workflow.
SELECT cwc.id, cwc.client_id, c.name, cwc.workflow_slug, cwc.workstream_slug, cwc.config, cwc.updated_at
FROM public.client_workflow_configs cwc
JOIN public.clients c ON c.id = cwc.client_id
WHERE (%(client_id)s::uuid IS NULL OR cwc.client_id = %(client_id)s)
  AND (%(workstream)s::text IS NULL OR cwc.workstream_slug = %(workstream)s)
  AND (%(workflow)s::text IS NULL OR cwc.workflow_slug = %(workflow)s)
ORDER BY c.name, cwc.workstream_slug, cwc.workflow_slug;
