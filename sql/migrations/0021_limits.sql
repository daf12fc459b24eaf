-- Limits as data (`wsctl limit ...`): a fleet-wide rate (token bucket) and an
-- in-flight cap per limit key, and the registry rows' bindings to key templates.
-- wsctl's own tables: nothing on the pipeline tables changes.

CREATE TABLE IF NOT EXISTS wsctl.limits (
    key            text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 200),
    -- spawns per second under this key (NULL: no rate limit), and the bucket size
    rate_per_second double precision CHECK (rate_per_second > 0),
    burst          integer CHECK (burst >= 1),
    -- states in flight at once under this key (NULL: no cap)
    max_in_flight  integer CHECK (max_in_flight >= 1),
    -- the token bucket the claim draws from, refilled at rate_per_second up to burst
    tokens         double precision,
    refilled_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (rate_per_second IS NOT NULL OR max_in_flight IS NOT NULL),
    CHECK ((rate_per_second IS NULL) = (burst IS NULL))
);

-- A registry row's limit keys: templates filled per state with {client}, {function},
-- {workstream}, {step} and {config.FIELD} (see wsctl.render_limit_key).
CREATE TABLE IF NOT EXISTS wsctl.registry_limit_keys (
    registry_id   uuid NOT NULL REFERENCES public.enrichment_registry (id) ON DELETE CASCADE,
    key_template  text NOT NULL CHECK (length(key_template) BETWEEN 1 AND 200),
    PRIMARY KEY (registry_id, key_template)
);

REVOKE ALL ON wsctl.limits, wsctl.registry_limit_keys FROM PUBLIC;

-- The key a template gives for one state. {config.FIELD} takes the field's text from
-- the client config of that step and workstream; a secret reference ({"$secret": NAME})
-- fills in as its NAME, never a value (the dispatcher never sees secrets); a missing
-- field fills in as the empty string.
CREATE OR REPLACE FUNCTION wsctl.render_limit_key(
    template text, client text, function text, workstream text, step text, config jsonb
)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $$
DECLARE
    out text := template;
    field text;
    v jsonb;
BEGIN
    IF position('{' IN template) = 0 THEN
        RETURN template;
    END IF;
    out := replace(out, '{client}', coalesce(client, ''));
    out := replace(out, '{function}', coalesce(function, ''));
    out := replace(out, '{workstream}', coalesce(workstream, ''));
    out := replace(out, '{step}', coalesce(step, ''));
    FOR field IN SELECT (regexp_matches(template, '\{config\.([A-Za-z0-9_]+)\}', 'g'))[1] LOOP
        v := config -> field;
        out := replace(out, '{config.' || field || '}', CASE
            WHEN v IS NULL OR jsonb_typeof(v) = 'null' THEN ''
            WHEN jsonb_typeof(v) = 'object' AND v ? '$secret' THEN coalesce(v ->> '$secret', '')
            WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}'
            ELSE v::text
        END);
    END LOOP;
    RETURN out;
END
$$;

REVOKE ALL ON FUNCTION wsctl.render_limit_key(text, text, text, text, text, jsonb) FROM PUBLIC;
