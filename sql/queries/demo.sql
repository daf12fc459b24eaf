-- Statements of `wsctl demo` (wsctl/demo.py). The example worker's own
-- statements live in examples/enrichment_queries.sql.

-- demo_clients_table --
-- Whether the target database has the pipeline's clients table yet (before migrating it).
SELECT to_regclass('public.clients') IS NOT NULL;

-- demo_other_clients --
-- Clients other than the demo's: their presence means this is not a demo database.
SELECT name FROM public.clients WHERE name <> %s ORDER BY name LIMIT 5;

-- demo_progress --
-- How the demo's batches stand: states per status.
SELECT status, count(*)::int AS n
FROM public.workflow_states
WHERE batch_id = ANY (%s::uuid[])
GROUP BY status;

-- demo_steps_done --
-- COMPLETED states of the demo's batches, and how many there are to complete (items x steps).
SELECT (SELECT count(*) FROM public.workflow_states
        WHERE batch_id = ANY (%s::uuid[]) AND status = 'COMPLETED')::int AS done,
       (SELECT coalesce(sum(cardinality(b.blueprint)
                            * (SELECT count(*) FROM public.batch_items bi WHERE bi.batch_id = b.id)),
                        0)
        FROM public.batches b WHERE b.id = ANY (%s::uuid[]))::int AS total;

-- demo_problems --
-- A sample of FAILED or BLOCKED states of the demo's batches, with their reasons.
SELECT step_name, status, last_error
FROM public.workflow_states
WHERE batch_id = ANY (%s::uuid[]) AND status IN ('FAILED', 'BLOCKED')
ORDER BY updated_at
LIMIT 3;

-- demo_report --
-- Per item and blueprint step: its state, the registry function for (step, batch workstream),
-- the trace the worker function wrote, and the config row that trace names (with its workstream).
SELECT bi.id AS item_id,
       b.workstream_slug AS workstream,
       s.step,
       ws.status,
       er.modal_sender_fn AS function,
       bi.data -> '_trace' -> s.step AS trace,
       cwc.id AS config_id,
       cwc.workstream_slug AS config_workstream,
       bi.data -> 'clay' -> s.step AS clay
FROM public.batches b
JOIN public.batch_items bi ON bi.batch_id = b.id
CROSS JOIN LATERAL unnest(b.blueprint) WITH ORDINALITY AS s(step, ord)
LEFT JOIN public.workflow_states ws ON ws.item_id = bi.id AND ws.step_name = s.step
LEFT JOIN public.enrichment_registry er
       ON er.slug = s.step AND er.workstream_slug = b.workstream_slug
LEFT JOIN public.client_workflow_configs cwc
       ON cwc.id::text = bi.data -> '_trace' -> s.step ->> 'config_id'
WHERE b.id = ANY (%s::uuid[])
ORDER BY array_position(%s::uuid[], b.id), bi.id, s.ord;

-- demo_unfinished_batches --
-- The demo client's batches with states still to finish (an interrupted earlier run).
SELECT DISTINCT b.id
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
JOIN public.workflow_states s ON s.batch_id = b.id
WHERE c.name = %s
  AND b.status NOT IN ('COMPLETED', 'CANCELLED')
  AND s.status NOT IN ('COMPLETED', 'CANCELLED');
