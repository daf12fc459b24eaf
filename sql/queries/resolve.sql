-- resolve_item --
-- An item's batch, its client and the workstream the batch carries (NULL on legacy batches).
SELECT bi.id, bi.batch_id, b.client_id, c.name, b.workstream_slug
FROM public.batch_items bi
JOIN public.batches b ON b.id = bi.batch_id
JOIN public.clients c ON c.id = b.client_id
WHERE bi.id = %s;

-- resolve_config_by_key --
-- One client config by its full composite key (client, workflow slug, workstream slug).
SELECT id, config, updated_at
FROM public.client_workflow_configs
WHERE client_id = %s AND workflow_slug = %s AND workstream_slug = %s;

-- resolve_client_workstreams --
-- The workstreams where a client has a config for a workflow slug (rule c for a client alone).
SELECT workstream_slug
FROM public.client_workflow_configs
WHERE client_id = %s AND workflow_slug = %s
ORDER BY workstream_slug;

-- resolve_registry --
-- One registry row by its composite key (step slug, workstream slug).
SELECT id, slug AS step, workstream_slug AS workstream, type, modal_sender_fn AS sender,
       modal_receiver_fn AS receiver, created_at
FROM public.enrichment_registry
WHERE slug = %s AND workstream_slug = %s;

-- worker_item_workstream --
-- The workstream_slug of an item's batch, for get_workstream_slug (no row: unknown item).
SELECT b.workstream_slug
FROM public.batch_items bi
JOIN public.batches b ON b.id = bi.batch_id
WHERE bi.id = %s;

-- worker_complete_step --
-- Mark one state COMPLETED and enqueue the item's next blueprint step (idempotent).
SELECT wsctl.complete_step(%s);

-- worker_fail_step --
-- Mark one state FAILED with its reason (COMPLETED and CANCELLED states are left alone).
SELECT wsctl.fail_step(%s, %s);
