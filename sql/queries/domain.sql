-- client_by_id --
-- Clients are named by id or name everywhere.
SELECT id, name FROM public.clients WHERE id = %s;

-- client_by_name --
-- Exact name match (names are unique).
SELECT id, name FROM public.clients WHERE name = %s;

-- infer_workstreams --
-- THE workstream inference, shared by backfill, config resolution and dispatch:
-- per batch, the workstreams registering every step of its blueprint, and
-- among those the ones where the batch's client has a config for a blueprint step.
WITH b AS (
    SELECT id, client_id, blueprint,
           cardinality(ARRAY(SELECT DISTINCT s FROM unnest(blueprint) AS s)) AS n_steps
    FROM public.batches
    WHERE id = ANY (%s::uuid[])
), registered AS (
    SELECT b.id AS batch_id, b.client_id, b.blueprint, er.workstream_slug
    FROM b
    JOIN public.enrichment_registry er ON er.slug = ANY (b.blueprint)
    GROUP BY b.id, b.client_id, b.blueprint, b.n_steps, er.workstream_slug
    HAVING count(DISTINCT er.slug) = b.n_steps AND b.n_steps > 0
)
SELECT r.batch_id,
       array_agg(r.workstream_slug ORDER BY r.workstream_slug) AS registered,
       array_agg(r.workstream_slug ORDER BY r.workstream_slug) FILTER (
           WHERE EXISTS (
               SELECT 1 FROM public.client_workflow_configs c
               WHERE c.client_id = r.client_id
                 AND c.workstream_slug = r.workstream_slug
                 AND c.workflow_slug = ANY (r.blueprint)
           )
       ) AS narrowed
FROM registered r
GROUP BY r.batch_id;
