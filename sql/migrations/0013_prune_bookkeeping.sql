-- `wsctl prune`: a summary row per pruned batch, so that `batch status` and
-- `item show` still answer for a batch whose states (and, with
-- --include-items, items) were removed, and the committed length of each
-- archive file, so that an interrupted prune resumes with every removed row in
-- the archive exactly once. New tables only: nothing on a busy table changes.

CREATE TABLE IF NOT EXISTS wsctl.pruned_batches (
    batch_id          uuid PRIMARY KEY REFERENCES public.batches (id) ON DELETE CASCADE,
    -- the latest state update when the prune began: when the batch finished
    finished_at       timestamptz NOT NULL,
    -- per step, the states by status when the prune began: {"step": {"COMPLETED": 3}}
    counts            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    items             bigint      NOT NULL DEFAULT 0,
    states_pruned     bigint      NOT NULL DEFAULT 0,
    items_pruned      bigint      NOT NULL DEFAULT 0,
    include_items     boolean     NOT NULL DEFAULT false,
    archive           text,
    started_at        timestamptz NOT NULL DEFAULT now(),
    -- set when no state of the batch is left (NULL: a prune was interrupted here)
    states_pruned_at  timestamptz,
    -- set when --include-items removed the last item
    items_pruned_at   timestamptz
);

CREATE TABLE IF NOT EXISTS wsctl.prune_archives (
    path             text PRIMARY KEY,
    -- the file's length after the last committed chunk: a resumed prune truncates to it
    committed_bytes  bigint      NOT NULL,
    committed_rows   bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON wsctl.pruned_batches, wsctl.prune_archives FROM PUBLIC;
