-- Columns the dispatcher, the worker helpers and the read side share.
-- ADD COLUMN with a constant default (or none) is a catalog change on
-- PostgreSQL 11+: no table rewrite, only a brief ACCESS EXCLUSIVE lock that the
-- runner bounds with --ddl-lock-timeout. Existing rows read the defaults.
ALTER TABLE public.workflow_states
    -- The dispatch generation: every claim increments it and nothing resets it
    -- (`attempts` is reset by `wsctl retry`), so a callback token or a worker
    -- guard bound to one generation is fenced against every later one.
    ADD COLUMN IF NOT EXISTS dispatch_generation bigint NOT NULL DEFAULT 0,
    -- The error class of the last failure (transient, operator, permanent;
    -- see wsctl/states.py) and a short reason code that groups and counts,
    -- beside last_error's free text.
    ADD COLUMN IF NOT EXISTS error_class text,
    ADD COLUMN IF NOT EXISTS reason_code text,
    -- When reconciliation last polled this state's call: polling the least
    -- recently polled first keeps long-running calls from starving the rest.
    ADD COLUMN IF NOT EXISTS last_polled_at timestamptz,
    -- What the worker helpers resolved when the step ran: the client config
    -- row (id, updated_at) and the registry row, as a small JSON document.
    ADD COLUMN IF NOT EXISTS used_resolution jsonb;
