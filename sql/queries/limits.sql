-- limits_get --
-- One limit by its key.
SELECT key, rate_per_second, burst, max_in_flight, created_at, updated_at
FROM wsctl.limits
WHERE key = %(key)s;

-- limits_list --
-- Every limit, by key.
SELECT key, rate_per_second, burst, max_in_flight, created_at, updated_at
FROM wsctl.limits
ORDER BY key;

-- limits_upsert --
-- Define or redefine a limit; a redefined rate refills its bucket from full.
INSERT INTO wsctl.limits AS l (key, rate_per_second, burst, max_in_flight, tokens, refilled_at)
VALUES (%(key)s, %(rate)s, %(burst)s::integer, %(max_in_flight)s, %(burst)s::integer, now())
ON CONFLICT (key) DO UPDATE
SET rate_per_second = EXCLUDED.rate_per_second,
    burst = EXCLUDED.burst,
    max_in_flight = EXCLUDED.max_in_flight,
    tokens = CASE WHEN l.rate_per_second IS DISTINCT FROM EXCLUDED.rate_per_second
                    OR l.burst IS DISTINCT FROM EXCLUDED.burst
                  THEN EXCLUDED.burst ELSE l.tokens END,
    refilled_at = CASE WHEN l.rate_per_second IS DISTINCT FROM EXCLUDED.rate_per_second
                         OR l.burst IS DISTINCT FROM EXCLUDED.burst
                       THEN now() ELSE l.refilled_at END,
    -- the point-of-call bucket (NULL: full) likewise
    call_tokens = CASE WHEN l.rate_per_second IS DISTINCT FROM EXCLUDED.rate_per_second
                         OR l.burst IS DISTINCT FROM EXCLUDED.burst
                       THEN NULL ELSE l.call_tokens END,
    updated_at = now()
RETURNING key, rate_per_second, burst, max_in_flight, created_at, updated_at,
          (xmax = 0) AS created;

-- limits_delete --
-- Remove a limit (the keys bound to it then limit nothing).
DELETE FROM wsctl.limits
WHERE key = %(key)s
RETURNING key, rate_per_second, burst, max_in_flight, created_at, updated_at;

-- limits_bindings_of_registry --
-- The key templates bound to registry rows, by row id.
SELECT registry_id, key_template
FROM wsctl.registry_limit_keys
WHERE registry_id = ANY (%(ids)s)
ORDER BY registry_id, key_template;

-- limits_unbind_registry --
-- Remove every key template bound to one registry row.
DELETE FROM wsctl.registry_limit_keys WHERE registry_id = %(registry_id)s;

-- limits_bind_registry --
-- Bind key templates to one registry row.
INSERT INTO wsctl.registry_limit_keys (registry_id, key_template)
SELECT %(registry_id)s, t FROM unnest(%(templates)s::text[]) AS t
ON CONFLICT DO NOTHING;

-- limits_bound_keys --
-- Every key the bindings give today: each template rendered for each client config of its
-- step and workstream (a template without placeholders is its own key), with whether a
-- limit defines it.
WITH rendered AS (
    SELECT DISTINCT k.key_template, er.slug AS step, er.workstream_slug AS workstream,
           wsctl.render_limit_key(k.key_template, c.name, er.modal_sender_fn,
                                  er.workstream_slug, er.slug, cfg.config) AS key
    FROM wsctl.registry_limit_keys k
    JOIN public.enrichment_registry er ON er.id = k.registry_id
    LEFT JOIN public.client_workflow_configs cfg
           ON cfg.workflow_slug = er.slug AND cfg.workstream_slug = er.workstream_slug
          AND position('{' IN k.key_template) > 0
    LEFT JOIN public.clients c ON c.id = cfg.client_id
)
SELECT r.key, r.key_template, r.step, r.workstream, (l.key IS NOT NULL) AS defined
FROM rendered r
LEFT JOIN wsctl.limits l ON l.key = r.key
ORDER BY r.key, r.workstream, r.step;

-- limits_keys_of_item --
-- The limit keys an item's state of one step is under (wsctl.limit_keys_of of its batch).
SELECT wsctl.limit_keys_of(bi.batch_id, %(step)s::text) AS keys
FROM public.batch_items bi
WHERE bi.id = %(item_id)s;
