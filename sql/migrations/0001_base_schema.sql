-- The production schema as the admin dashboard created it before wsctl
-- (tests/fixtures/legacy_schema.sql). Idempotent: a fresh database gets this
-- shape; an existing production database is adopted without touching a row.

CREATE TABLE IF NOT EXISTS public.clients (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.enrichment_registry (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug               text NOT NULL,
    workstream_slug    text NOT NULL,
    type               text NOT NULL CHECK (type IN ('sync', 'async')),
    modal_sender_fn    text NOT NULL,
    modal_receiver_fn  text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (slug, workstream_slug)
);

CREATE TABLE IF NOT EXISTS public.client_workflow_configs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id        uuid NOT NULL REFERENCES public.clients (id),
    workflow_slug    text NOT NULL,
    workstream_slug  text NOT NULL,
    config           jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (client_id, workflow_slug, workstream_slug)
);

CREATE TABLE IF NOT EXISTS public.batches (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id   uuid NOT NULL REFERENCES public.clients (id),
    blueprint   text[] NOT NULL,
    status      text NOT NULL DEFAULT 'PENDING',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.batch_items (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id    uuid NOT NULL REFERENCES public.batches (id) ON DELETE CASCADE,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.workflow_states (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    item_id     uuid NOT NULL REFERENCES public.batch_items (id) ON DELETE CASCADE,
    batch_id    uuid NOT NULL REFERENCES public.batches (id) ON DELETE CASCADE,
    step_name   text NOT NULL,
    status      text NOT NULL DEFAULT 'PENDING',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (item_id, step_name)
);
