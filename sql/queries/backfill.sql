-- backfill_next_chunk --
-- The next batches without a workstream, by primary key after the cursor (NULL: from the
-- start), optionally only among the given ids.
SELECT id FROM public.batches
WHERE workstream_slug IS NULL
  AND (%(after)s::uuid IS NULL OR id > %(after)s::uuid)
  AND (%(scope)s::uuid[] IS NULL OR id = ANY (%(scope)s::uuid[]))
ORDER BY id
LIMIT %(limit)s;

-- backfill_count_null --
-- How many batches without a workstream lie ahead of the cursor (for the progress bar).
SELECT count(*) FROM public.batches
WHERE workstream_slug IS NULL
  AND (%(after)s::uuid IS NULL OR id > %(after)s::uuid)
  AND (%(scope)s::uuid[] IS NULL OR id = ANY (%(scope)s::uuid[]));

-- backfill_null_total --
-- Batches without a workstream anywhere in the table (what --enforce must see at zero).
SELECT count(*) FROM public.batches WHERE workstream_slug IS NULL;

-- backfill_existing_ids --
-- Which of the ids given with --batch exist, and whether they already have a workstream.
SELECT id, workstream_slug IS NOT NULL FROM public.batches WHERE id = ANY (%s::uuid[]);

-- backfill_set --
-- Set the workstream of each batch in the chunk, never overwriting: a batch the dashboard
-- set meanwhile keeps its value. Touches no other column.
UPDATE public.batches b
SET workstream_slug = v.workstream_slug
FROM unnest(%s::uuid[], %s::text[]) AS v (id, workstream_slug)
WHERE b.id = v.id
  AND b.workstream_slug IS NULL
RETURNING b.id;

-- backfill_checkpoint_get --
-- Where an interrupted run stopped (the last batch id of its last finished chunk).
SELECT last_id, updated_at FROM wsctl.backfill_progress WHERE job = %s;

-- backfill_checkpoint_set --
-- Written in each chunk's own transaction, so the checkpoint never runs ahead of the data.
INSERT INTO wsctl.backfill_progress (job, last_id, updated_at)
VALUES (%s, %s, now())
ON CONFLICT (job) DO UPDATE SET last_id = excluded.last_id, updated_at = excluded.updated_at;

-- backfill_checkpoint_clear --
-- A finished walk forgets its checkpoint: the next run scans from the start.
DELETE FROM wsctl.backfill_progress WHERE job = %s;

-- backfill_check_state --
-- The --enforce check constraint: absent (no row), NOT VALID (false) or validated (true).
SELECT convalidated FROM pg_catalog.pg_constraint
WHERE conrelid = 'public.batches'::regclass
  AND conname = 'batches_workstream_slug_not_null';

-- backfill_add_check --
-- NOT VALID: a brief lock, no scan; every new or updated batch must carry a workstream.
ALTER TABLE public.batches
    ADD CONSTRAINT batches_workstream_slug_not_null CHECK (workstream_slug IS NOT NULL) NOT VALID;

-- backfill_validate_check --
-- Checks the existing rows under SHARE UPDATE EXCLUSIVE (reads and writes go on meanwhile).
ALTER TABLE public.batches VALIDATE CONSTRAINT batches_workstream_slug_not_null;
