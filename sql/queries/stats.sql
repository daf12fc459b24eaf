-- stats_read_only --
-- The first statement of every `wsctl stats` and `wsctl ui` transaction: nothing they run can write.
SET TRANSACTION READ ONLY;

-- stats_state_counts --
-- States per (workstream, step, status), exact: an index-only scan of
-- idx_workflow_states_batch_status (batch_id, status, step_name), grouped, then the few batches.
SELECT b.workstream_slug AS workstream, s.step_name AS step, s.status, sum(s.n)::bigint AS states
FROM (
    SELECT batch_id, status, step_name, count(*) AS n
    FROM public.workflow_states
    GROUP BY batch_id, status, step_name
) s
JOIN public.batches b ON b.id = s.batch_id
WHERE %(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text
GROUP BY b.workstream_slug, s.step_name, s.status
ORDER BY b.workstream_slug NULLS FIRST, s.step_name, s.status;

-- stats_total_estimate --
-- The planner's row estimate of workflow_states (pg_class.reltuples; -1 before the first ANALYZE).
SELECT c.reltuples::bigint AS estimate
FROM pg_class c
WHERE c.oid = 'public.workflow_states'::regclass;

-- stats_not_due --
-- PENDING states whose available_at is still ahead (retries backing off; few), per workstream
-- (idx_workflow_states_claim_pending). Due = PENDING (the exact counts above) minus these.
SELECT b.workstream_slug AS workstream, count(*)::bigint AS states
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
WHERE ws.status = 'PENDING' AND ws.available_at > now()
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
GROUP BY b.workstream_slug;

-- stats_oldest_due --
-- Per workstream, the available_at of its oldest due state: a walk of
-- idx_workflow_states_claim_pending in order that stops at the workstream's first state.
SELECT w.workstream, o.available_at AS oldest_due_at
FROM (
    SELECT DISTINCT bb.workstream_slug AS workstream
    FROM public.batches bb
    WHERE %(workstream)s::text IS NULL OR bb.workstream_slug = %(workstream)s::text
) w
CROSS JOIN LATERAL (
    SELECT ws.available_at
    FROM public.workflow_states ws
    JOIN public.batches b ON b.id = ws.batch_id
    WHERE ws.status = 'PENDING' AND ws.available_at <= now()
      AND b.workstream_slug IS NOT DISTINCT FROM w.workstream
    ORDER BY ws.available_at
    LIMIT 1
) o;

-- stats_recent --
-- The states updated in the last hour (idx_workflow_states_updated_at), in one pass: per
-- (workstream, step, config row used) how many were dispatched, completed and failed in the last
-- 5 minutes and the last hour, and how many ran with a config row that has changed since (or is
-- gone). Every write of a state sets updated_at, so every state dispatched, completed or failed in
-- the hour is among them; a FAILED state's time is its updated_at.
SELECT b.workstream_slug AS workstream, ws.step_name AS step,
       ws.used_resolution ->> 'config_id' AS config_id,
       count(*) FILTER (WHERE ws.dispatched_at >= now() - interval '5 minutes')::bigint
           AS dispatched_5m,
       count(*) FILTER (WHERE ws.dispatched_at >= now() - interval '1 hour')::bigint
           AS dispatched_1h,
       count(*) FILTER (WHERE ws.status = 'COMPLETED'
                          AND ws.completed_at >= now() - interval '5 minutes')::bigint
           AS completed_5m,
       count(*) FILTER (WHERE ws.status = 'COMPLETED'
                          AND ws.completed_at >= now() - interval '1 hour')::bigint
           AS completed_1h,
       count(*) FILTER (WHERE ws.status = 'FAILED'
                          AND ws.updated_at >= now() - interval '5 minutes')::bigint
           AS failed_5m,
       count(*) FILTER (WHERE ws.status = 'FAILED')::bigint AS failed_1h,
       count(*) FILTER (WHERE ws.used_resolution ->> 'config_id' IS NOT NULL)::bigint
           AS used_config,
       count(*) FILTER (
           WHERE ws.used_resolution ->> 'config_id' IS NOT NULL
             AND (cwc.id IS NULL
                  OR cwc.updated_at > (ws.used_resolution ->> 'config_updated_at')::timestamptz)
       )::bigint AS changed_since
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
LEFT JOIN public.client_workflow_configs cwc
       ON cwc.id = (ws.used_resolution ->> 'config_id')::uuid
WHERE ws.updated_at >= now() - interval '1 hour'
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
GROUP BY b.workstream_slug, ws.step_name, ws.used_resolution ->> 'config_id';

-- stats_overdue --
-- DISPATCHED states waiting longer than the callback timeout, per workstream and step
-- (idx_workflow_states_dispatched).
SELECT b.workstream_slug AS workstream, ws.step_name AS step, count(*)::bigint AS states,
       min(ws.dispatched_at) AS oldest_dispatched_at
FROM public.workflow_states ws
JOIN public.batches b ON b.id = ws.batch_id
WHERE ws.status = 'DISPATCHED'
  AND ws.dispatched_at < now() - make_interval(secs => %(timeout)s)
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
GROUP BY b.workstream_slug, ws.step_name
ORDER BY b.workstream_slug NULLS FIRST, ws.step_name;

-- stats_reasons --
-- BLOCKED and FAILED states per (workstream, step, status, reason code): never by last_error's
-- free text. NULL reason: the state failed before reason codes (reported as unclassified).
-- An index-only scan of idx_workflow_states_needs_operator (migration 0016): those rows only.
SELECT b.workstream_slug AS workstream, ws.step_name AS step, ws.status,
       ws.reason_code AS reason, ws.error_class, sum(ws.n)::bigint AS states
FROM (
    SELECT batch_id, step_name, status, reason_code, error_class, count(*) AS n
    FROM public.workflow_states
    WHERE status IN ('BLOCKED', 'FAILED')
    GROUP BY batch_id, step_name, status, reason_code, error_class
) ws
JOIN public.batches b ON b.id = ws.batch_id
WHERE %(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text
GROUP BY b.workstream_slug, ws.step_name, ws.status, ws.reason_code, ws.error_class
ORDER BY sum(ws.n) DESC, b.workstream_slug NULLS FIRST, ws.step_name, ws.status, ws.reason_code;

-- stats_now --
-- The transaction's time: every age and window is measured from it.
SELECT now() AS now;

-- stats_record_used_resolution --
-- The worker helpers, each time they resolve a step's client config: what they resolved (the
-- config row and its updated_at, the registry row of (step, workstream)) goes on the item's state
-- for that step. updated_at is left alone: this is a note, not a transition.
UPDATE public.workflow_states ws
SET used_resolution = jsonb_build_object(
        'config_id', %(config_id)s::uuid,
        'config_updated_at', %(config_updated_at)s::timestamptz,
        'registry_id', (SELECT er.id FROM public.enrichment_registry er
                        WHERE er.slug = %(step)s AND er.workstream_slug = %(workstream)s::text),
        'workstream_slug', %(workstream)s::text,
        'status', %(status)s::text,
        'source', %(source)s::text,
        'dispatch_generation', ws.dispatch_generation,
        'resolved_at', now())
WHERE ws.item_id = %(item_id)s AND ws.step_name = %(step)s
RETURNING ws.id;

-- stats_item_used_resolutions --
-- `item show` and the dashboard: per state of an item, what the worker helpers recorded as used,
-- with the config row as it is now (gone: NULL) and the registry row's function.
SELECT ws.step_name AS step,
       (ws.used_resolution ->> 'config_id')::uuid AS config_id,
       (ws.used_resolution ->> 'config_updated_at')::timestamptz AS config_updated_at,
       (ws.used_resolution ->> 'registry_id')::uuid AS registry_id,
       ws.used_resolution ->> 'workstream_slug' AS workstream,
       ws.used_resolution ->> 'status' AS status,
       ws.used_resolution ->> 'source' AS source,
       (ws.used_resolution ->> 'resolved_at')::timestamptz AS resolved_at,
       cwc.id IS NOT NULL AS config_exists,
       cwc.updated_at AS config_updated_at_now,
       er.modal_sender_fn AS registry_function
FROM public.workflow_states ws
LEFT JOIN public.client_workflow_configs cwc
       ON cwc.id = (ws.used_resolution ->> 'config_id')::uuid
LEFT JOIN public.enrichment_registry er
       ON er.id = (ws.used_resolution ->> 'registry_id')::uuid
WHERE ws.item_id = %(item_id)s AND ws.used_resolution IS NOT NULL;

-- stats_limits --
-- Every limit with what is under its key now, in one statement: states in flight (claimed with
-- a live lease, or DISPATCHED) over the registry rows bound to a key, and the rate's bucket
-- refilled to now. Only the in-flight rows are read: the partial indexes
-- idx_workflow_states_claim_lease (DISPATCHING) and idx_workflow_states_dispatched (DISPATCHED),
-- never the rest of workflow_states. They are counted per (batch, step) first, so a key is
-- rendered once per group, not once per state (a key depends on the batch's client and
-- workstream, the step and its config: all the same within a group).
WITH live AS (
    SELECT f.batch_id, f.step_name, count(*) AS n
    FROM (
        SELECT ws.batch_id, ws.step_name
        FROM public.workflow_states ws
        WHERE ws.status = 'DISPATCHING' AND ws.lease_expires_at > now()
        UNION ALL
        SELECT ws.batch_id, ws.step_name
        FROM public.workflow_states ws
        WHERE ws.status = 'DISPATCHED'
    ) f
    GROUP BY f.batch_id, f.step_name
), in_flight AS (
    SELECT wsctl.render_limit_key(k.key_template, c.name, er.modal_sender_fn,
                                  b.workstream_slug, lv.step_name, cfg.config) AS key,
           sum(lv.n) AS n
    FROM live lv
    JOIN public.batches b ON b.id = lv.batch_id
    JOIN public.enrichment_registry er
      ON er.slug = lv.step_name AND er.workstream_slug = b.workstream_slug
    JOIN wsctl.registry_limit_keys k ON k.registry_id = er.id
    JOIN public.clients c ON c.id = b.client_id
    LEFT JOIN public.client_workflow_configs cfg
           ON cfg.client_id = b.client_id AND cfg.workflow_slug = lv.step_name
          AND cfg.workstream_slug = b.workstream_slug
    GROUP BY 1
)
SELECT l.key, l.rate_per_second, l.burst, l.max_in_flight,
       coalesce(f.n, 0)::bigint AS in_flight,
       CASE WHEN l.rate_per_second IS NOT NULL THEN
           -- a bucket holds burst - 1 tokens at most (wsctl.dispatch.pacing.capacity)
           least(greatest(l.burst - 1, 1),
                 coalesce(l.tokens, l.burst) + l.rate_per_second
                 * greatest(0, extract(epoch FROM now() - coalesce(l.refilled_at, now()))))
       END::double precision AS tokens_now
FROM wsctl.limits l
LEFT JOIN in_flight f ON f.key = l.key
ORDER BY l.key;
