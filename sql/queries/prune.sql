-- prune_candidates --
-- Batches whose states are all finished (COMPLETED, CANCELLED, FAILED: none pending, in flight,
-- blocked or in a status the dashboard invented) and whose latest state update is older than
-- the cutoff, oldest first, with batches a prune left half-done. "Not finished" is four range
-- probes on idx_workflow_states_batch_status (status < 'CANCELLED', between the three finished
-- statuses, > 'FAILED'): a few index descents per batch, whatever its size.
-- %(batch_ids)s NULL: every batch. A batch created after the cutoff cannot have finished before
-- it, so only older ones have their states read for the finish time (and a prune begun).
-- %(max_batches)s (doctor) bounds how many finished batches are read, oldest first; NULL: all.
WITH finished AS MATERIALIZED (
    SELECT b.id
    FROM public.batches b
    LEFT JOIN wsctl.pruned_batches pb ON pb.batch_id = b.id
    WHERE (%(batch_ids)s::uuid[] IS NULL OR b.id = ANY (%(batch_ids)s::uuid[]))
      AND (b.created_at < now() - %(older_than)s::interval OR pb.batch_id IS NOT NULL)
      -- one NOT EXISTS per range: ORed in one subquery they became a Filter over every
      -- index entry of the batch (0.9 s for 269 batches with 10,000,000 states)
      AND NOT EXISTS (SELECT 1 FROM public.workflow_states s
                      WHERE s.batch_id = b.id AND s.status < 'CANCELLED')
      AND NOT EXISTS (SELECT 1 FROM public.workflow_states s
                      WHERE s.batch_id = b.id AND s.status > 'CANCELLED' AND s.status < 'COMPLETED')
      AND NOT EXISTS (SELECT 1 FROM public.workflow_states s
                      WHERE s.batch_id = b.id AND s.status > 'COMPLETED' AND s.status < 'FAILED')
      AND NOT EXISTS (SELECT 1 FROM public.workflow_states s
                      WHERE s.batch_id = b.id AND s.status > 'FAILED')
    ORDER BY b.created_at, b.id
    LIMIT %(max_batches)s
)
SELECT f.id AS batch_id,
       coalesce(pb.finished_at, agg.finished_at) AS finished_at,
       agg.states AS states,
       pb.batch_id IS NOT NULL AS resumed,
       (SELECT count(*) FROM finished) AS examined
FROM finished f
LEFT JOIN wsctl.pruned_batches pb ON pb.batch_id = f.id
CROSS JOIN LATERAL (
    SELECT max(s.updated_at) AS finished_at, count(*) AS states
    FROM public.workflow_states s
    WHERE s.batch_id = f.id
) agg
WHERE (
      -- a prune began here and was interrupted: finish it whatever the cutoff
      (pb.batch_id IS NOT NULL
       AND (pb.states_pruned_at IS NULL
            OR (%(include_items)s AND pb.include_items AND pb.items_pruned_at IS NULL)))
      OR (agg.states > 0 AND agg.finished_at < now() - %(older_than)s::interval)
      -- states pruned earlier without --include-items: now its items
      OR (%(include_items)s AND pb.states_pruned_at IS NOT NULL AND pb.items_pruned_at IS NULL
          AND pb.finished_at < now() - %(older_than)s::interval)
  )
ORDER BY coalesce(pb.finished_at, agg.finished_at), f.id;

-- prune_explain_batch --
-- Why an explicit --batch is not a candidate: its states by whether they are finished.
SELECT count(*) AS states,
       count(*) FILTER (WHERE status NOT IN ('COMPLETED', 'CANCELLED', 'FAILED')) AS unfinished,
       max(updated_at) AS finished_at
FROM public.workflow_states
WHERE batch_id = %s;

-- prune_lock_batch --
-- The chunk's batch, locked FOR UPDATE: it conflicts with the KEY SHARE lock that inserting a
-- state takes (foreign key) and with complete_steps' NO KEY UPDATE, so no state of the batch
-- appears or completes while the chunk runs.
SELECT id FROM public.batches WHERE id = %s FOR UPDATE;

-- prune_batch_unfinished --
-- Whether the batch has a state that is not finished (the same four range probes), re-read in
-- every chunk's transaction after the batch is locked.
SELECT EXISTS (SELECT 1 FROM public.workflow_states s
               WHERE s.batch_id = %(batch_id)s AND s.status < 'CANCELLED')
    OR EXISTS (SELECT 1 FROM public.workflow_states s
               WHERE s.batch_id = %(batch_id)s AND s.status > 'CANCELLED' AND s.status < 'COMPLETED')
    OR EXISTS (SELECT 1 FROM public.workflow_states s
               WHERE s.batch_id = %(batch_id)s AND s.status > 'COMPLETED' AND s.status < 'FAILED')
    OR EXISTS (SELECT 1 FROM public.workflow_states s
               WHERE s.batch_id = %(batch_id)s AND s.status > 'FAILED') AS unfinished;

-- prune_batch_snapshot --
-- What the summary row keeps, read once before the first chunk: states per step and status,
-- the finish time and the items.
SELECT coalesce((SELECT jsonb_object_agg(step_name, by_status)
                 FROM (SELECT step_name, jsonb_object_agg(status, n) AS by_status
                       FROM (SELECT step_name, status, count(*) AS n
                             FROM public.workflow_states
                             WHERE batch_id = %(batch_id)s
                             GROUP BY step_name, status) c
                       GROUP BY step_name) s), '{}'::jsonb) AS counts,
       (SELECT max(updated_at) FROM public.workflow_states WHERE batch_id = %(batch_id)s)
           AS finished_at,
       (SELECT count(*) FROM public.batch_items WHERE batch_id = %(batch_id)s) AS items;

-- prune_summary_insert --
-- The batch's summary row, written in its first chunk's transaction.
INSERT INTO wsctl.pruned_batches (batch_id, finished_at, counts, items, include_items, archive)
VALUES (%(batch_id)s, %(finished_at)s, %(counts)s, %(items)s, %(include_items)s, %(archive)s)
ON CONFLICT (batch_id) DO UPDATE
SET include_items = wsctl.pruned_batches.include_items OR EXCLUDED.include_items,
    archive = coalesce(EXCLUDED.archive, wsctl.pruned_batches.archive);

-- prune_summary_note --
-- A resumed batch: remember --include-items and the archive this run writes to.
UPDATE wsctl.pruned_batches
SET include_items = include_items OR %(include_items)s,
    archive = coalesce(%(archive)s, archive)
WHERE batch_id = %(batch_id)s;

-- prune_items_left --
-- Whether any item of the batch is left.
SELECT EXISTS (SELECT 1 FROM public.batch_items WHERE batch_id = %s);

-- prune_summary_get --
-- One batch's summary row (NULL: never pruned).
SELECT batch_id, finished_at, counts, items, states_pruned, items_pruned, include_items,
       archive, started_at, states_pruned_at, items_pruned_at
FROM wsctl.pruned_batches
WHERE batch_id = %s;

-- prune_select_states --
-- The next chunk of the batch's states, locked, each as its row's JSON (every column, including
-- any the dashboard added), for the archive.
SELECT s.id, to_jsonb(s)::text AS doc
FROM public.workflow_states s
WHERE s.batch_id = %(batch_id)s
LIMIT %(limit)s
-- never wait on a state row: a callback completing a FAILED state holds it and then waits for
-- the batch row this chunk holds (waiting here would be a deadlock)
FOR UPDATE SKIP LOCKED;

-- prune_delete_states --
-- Remove the chunk's states (locked by prune_select_states in the same transaction).
DELETE FROM public.workflow_states WHERE id = ANY (%s::uuid[]);

-- prune_states_left --
-- Whether any state of the batch is left.
SELECT EXISTS (SELECT 1 FROM public.workflow_states WHERE batch_id = %s);

-- prune_select_items --
-- The next chunk of the batch's items (--include-items), locked, each as its row's JSON.
SELECT i.id, to_jsonb(i)::text AS doc
FROM public.batch_items i
WHERE i.batch_id = %(batch_id)s
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- prune_delete_items --
-- Remove the chunk's items (--include-items; no state of the batch is left).
DELETE FROM public.batch_items WHERE id = ANY (%s::uuid[]);

-- prune_summary_add --
-- Count a committed chunk into the summary; mark the states or the items done.
UPDATE wsctl.pruned_batches
SET states_pruned = states_pruned + %(states)s,
    items_pruned = items_pruned + %(items)s,
    states_pruned_at = CASE WHEN %(states_done)s THEN coalesce(states_pruned_at, now())
                            ELSE states_pruned_at END,
    items_pruned_at = CASE WHEN %(items_done)s THEN coalesce(items_pruned_at, now())
                           ELSE items_pruned_at END
WHERE batch_id = %(batch_id)s;

-- prune_archive_register --
-- An archive file seen for the first time: what it holds already is not ours, keep it.
INSERT INTO wsctl.prune_archives (path, committed_bytes)
VALUES (%s, %s)
ON CONFLICT (path) DO NOTHING;

-- prune_archive_get --
-- The archive's committed length (what a resumed prune truncates the file to).
SELECT committed_bytes, committed_rows FROM wsctl.prune_archives WHERE path = %s;

-- prune_archive_commit --
-- The archive's new committed length, in the same transaction as the chunk's DELETE.
UPDATE wsctl.prune_archives
SET committed_bytes = %(bytes)s, committed_rows = committed_rows + %(rows)s, updated_at = now()
WHERE path = %(path)s AND committed_bytes = %(expected)s
RETURNING committed_bytes;

-- prune_pruned_count --
-- How many batches had their items removed (item show's answer for an unknown item id).
SELECT count(*) AS batches, max(items_pruned_at) AS last
FROM wsctl.pruned_batches
WHERE items_pruned > 0;

-- prune_doctor_bloat --
-- doctor: live and dead tuples of workflow_states, its size, and when it was last vacuumed.
SELECT coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) AS dead,
       pg_total_relation_size('public.workflow_states') AS total_bytes,
       pg_relation_size('public.workflow_states') AS heap_bytes,
       greatest(s.last_vacuum, s.last_autovacuum) AS last_vacuum,
       c.reloptions AS reloptions
FROM pg_class c
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = 'public.workflow_states'::regclass;

-- prune_doctor_oldest_xmin --
-- doctor: the backend of this database whose snapshot (backend_xmin) is oldest (this connection
-- excluded): no row version newer than its snapshot can be vacuumed away from this database.
SELECT a.pid, a.usename, a.application_name, a.state, a.xact_start,
       age(a.backend_xmin) AS xmin_age,
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::bigint AS seconds,
       left(a.query, 120) AS query
FROM pg_stat_activity a
WHERE a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
  AND (a.datname = current_database() OR a.backend_type = 'walsender')
ORDER BY age(a.backend_xmin) DESC
LIMIT 1;

-- prune_doctor_held_xmin --
-- doctor: prepared transactions of this database and replication slots holding an xmin (a
-- standby's hot_standby_feedback), which hold back vacuum like a session.
SELECT 'prepared transaction ' || gid AS what, extract(epoch FROM now() - prepared)::bigint AS seconds
FROM pg_prepared_xacts
WHERE database = current_database()
UNION ALL
SELECT 'replication slot ' || slot_name, NULL::bigint
FROM pg_replication_slots
WHERE xmin IS NOT NULL
ORDER BY 2 DESC NULLS LAST
LIMIT 5;

-- tune_current --
-- `wsctl db tune`: the per-table storage parameters workflow_states has now.
SELECT coalesce(reloptions, '{}') AS reloptions
FROM pg_class
WHERE oid = 'public.workflow_states'::regclass;

-- tune_apply --
-- `wsctl db tune --apply`: autovacuum by row counts that suit a table of millions of rows (the
-- defaults wait for 20% of the table to be dead). SHARE UPDATE EXCLUSIVE: reads and writes go on;
-- nothing is rewritten.
ALTER TABLE public.workflow_states SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.01
);
