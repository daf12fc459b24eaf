-- Tables of the example enrichment worker (examples/enrichment_app.py).
--
-- They belong to the example, not to wsctl: `wsctl migrate` never creates
-- them. `wsctl demo` applies this file to its own database; to use the
-- example against yours, apply it once yourself:
--
--   psql "$WSCTL_DATABASE_URL" -f examples/enrichment_schema.sql
--
-- Idempotent (IF NOT EXISTS throughout), so applying it again is harmless.

CREATE SCHEMA IF NOT EXISTS enrichment_example;

-- One row per company and client; company_key is the normalized domain, or
-- "name:<match key>" when the scrape had no usable website.
CREATE TABLE IF NOT EXISTS enrichment_example.companies (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id       uuid NOT NULL REFERENCES public.clients (id) ON DELETE CASCADE,
    company_key     text NOT NULL,
    name            text NOT NULL,
    domain          text,
    linkedin_url    text,
    employees       bigint,
    annual_revenue  bigint,
    industry        text,
    country         text,
    source          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (client_id, company_key)
);

-- One row per raw scrape item (a re-run of the split updates it in place).
CREATE TABLE IF NOT EXISTS enrichment_example.people (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    item_id          uuid NOT NULL UNIQUE REFERENCES public.batch_items (id) ON DELETE CASCADE,
    client_id        uuid NOT NULL REFERENCES public.clients (id) ON DELETE CASCADE,
    company_id       uuid REFERENCES enrichment_example.companies (id) ON DELETE SET NULL,
    workstream_slug  text,
    first_name       text,
    last_name        text,
    full_name        text,
    title            text,
    seniority        text,
    department       text,
    email            text,
    email_status     text,
    linkedin_url     text,
    city             text,
    country          text,
    source           text NOT NULL,
    raw              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS people_company_id_idx ON enrichment_example.people (company_id);

-- One row per (workflow state, dispatch generation) the Clay sender handed to
-- Clay: the sender inserts it (ON CONFLICT DO NOTHING) and commits BEFORE it
-- posts, so of all the runs of one generation (a Modal input retry, an overrun
-- pass) only the first posts; a new generation (after `wsctl retry` or a
-- retryable failure) posts again. posted_at/http_status, or error, say how the
-- POST ended; neither means the sender stopped mid-POST (outcome unknown).
-- webhook_digest: the SHA-256 of the webhook source that took the POST (as
-- wsctl.clay.digest and `wsctl stats` key it), never the URL: a Clay
-- webhook URL is itself the secret that lets anyone post into the table.
CREATE TABLE IF NOT EXISTS enrichment_example.clay_sends (
    state_id             uuid NOT NULL REFERENCES public.workflow_states (id) ON DELETE CASCADE,
    dispatch_generation  bigint NOT NULL,
    item_id              uuid NOT NULL,
    step_name            text NOT NULL,
    webhook_digest       text,
    claimed_at           timestamptz NOT NULL DEFAULT now(),
    posted_at            timestamptz,
    http_status          integer,
    error                text,
    PRIMARY KEY (state_id, dispatch_generation)
);

-- A table made by an earlier version of this file kept the URL in clear
-- (webhook_url): the column goes. Its rows keep no digest: the URL they named
-- was the config's first source, not always the one that took the POST, and a
-- source given as a secret reference is counted under the reference's name.
ALTER TABLE enrichment_example.clay_sends ADD COLUMN IF NOT EXISTS webhook_digest text;
ALTER TABLE enrichment_example.clay_sends DROP COLUMN IF EXISTS webhook_url;
