-- Enforcing limits (`wsctl limit ...`): the keys a (batch, step) is under, and a second
-- token bucket per limit for the point of call (the worker helpers take a token just
-- before they reach the service: Modal may run queued inputs in a burst). wsctl's own
-- small tables only: nothing on the pipeline tables changes.

ALTER TABLE wsctl.limits ADD COLUMN IF NOT EXISTS call_tokens double precision;
ALTER TABLE wsctl.limits ADD COLUMN IF NOT EXISTS call_refilled_at timestamptz;

-- The limit keys a state of step p_step in batch p_batch is under: every key template
-- bound to the registry row of (step, the batch's workstream), rendered for the batch's
-- client and its client config of that step and workstream (wsctl.render_limit_key).
-- A state's keys depend only on its batch and step, so the claim renders them once per
-- (batch, step), never per state. SECURITY DEFINER: the bindings are the operator's
-- table, and the worker helpers need the keys (only keys come out: a secret reference
-- renders as its name).
CREATE OR REPLACE FUNCTION wsctl.limit_keys_of(p_batch uuid, p_step text)
RETURNS text[]
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog
AS $$
    SELECT coalesce(array_agg(k.key ORDER BY k.key), '{}'::text[])
    FROM (
        SELECT DISTINCT wsctl.render_limit_key(rk.key_template, c.name, er.modal_sender_fn,
                                               b.workstream_slug, p_step, cfg.config) AS key
        FROM public.batches b
        JOIN public.enrichment_registry er
          ON er.slug = p_step AND er.workstream_slug = b.workstream_slug
        JOIN wsctl.registry_limit_keys rk ON rk.registry_id = er.id
        LEFT JOIN public.clients c ON c.id = b.client_id
        LEFT JOIN public.client_workflow_configs cfg
               ON cfg.client_id = b.client_id AND cfg.workflow_slug = p_step
              AND cfg.workstream_slug = b.workstream_slug
        WHERE b.id = p_batch
    ) k
$$;

REVOKE ALL ON FUNCTION wsctl.limit_keys_of(uuid, text) FROM PUBLIC;
