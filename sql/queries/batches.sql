-- batch_known_workstreams --
-- A workstream is known when it has registry rows.
SELECT DISTINCT workstream_slug FROM public.enrichment_registry ORDER BY 1;

-- batch_registered_steps --
-- Which of the given steps are registered in the workstream.
SELECT slug FROM public.enrichment_registry
WHERE workstream_slug = %s AND slug = ANY (%s::text[]);

-- batch_configured_steps --
-- Which of the given steps the client has a config for in the workstream.
SELECT workflow_slug FROM public.client_workflow_configs
WHERE client_id = %s AND workstream_slug = %s AND workflow_slug = ANY (%s::text[]);

-- batch_insert --
-- The batch row, carrying its workstream from birth.
INSERT INTO public.batches (id, client_id, blueprint, status, workstream_slug)
VALUES (%s, %s, %s::text[], 'PENDING', %s)
RETURNING created_at;

-- batch_dedupe_claim --
-- Claim a dedupe key in the creating transaction; no row back means another batch holds it
-- (a concurrent create with the same key waits here until the first one commits or rolls back).
INSERT INTO wsctl.batch_dedupe_keys (dedupe_key, batch_id)
VALUES (%s, %s)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING batch_id;

-- batch_dedupe_lookup --
-- The batch a dedupe key names.
SELECT batch_id FROM wsctl.batch_dedupe_keys WHERE dedupe_key = %s;

-- batch_utf8 --
-- The binary COPY sends the items' JSON as UTF-8 whatever the session's client encoding.
SELECT set_config('client_encoding', 'UTF8', true);

-- batch_items_copy --
-- Bulk load of the items, streamed from the item file in COPY's binary format
-- (ids made client-side, see batches.py).
COPY public.batch_items (id, batch_id, data) FROM STDIN (FORMAT binary);

-- batch_lock_item_tables --
-- The lock the item and state inserts take anyway (it lets other writers in), taken before
-- the trigger check below so that no trigger can be created on these tables meanwhile
-- (a partition attached meanwhile is caught by checking again after the inserts).
LOCK TABLE public.batch_items, public.workflow_states IN ROW EXCLUSIVE MODE;

-- batch_fk_skip_is_safe --
-- Whether session_replication_role = replica would skip nothing on an INSERT into
-- batch_items or workflow_states (partitions included) but the three foreign keys' own
-- checks, and the current setting, to restore. Why and what exactly: the module
-- docstring of wsctl/batches.py (the one copy of that explanation).
WITH rels (relid) AS (  -- pg_partition_tree gives no row for a table that is not partitioned
    SELECT unnest(ARRAY['public.batch_items'::regclass, 'public.workflow_states'::regclass])
    UNION
    SELECT relid FROM pg_catalog.pg_partition_tree('public.batch_items'::regclass)
    UNION
    SELECT relid FROM pg_catalog.pg_partition_tree('public.workflow_states'::regclass)
),
fks AS (
    SELECT c.oid,
           (coalesce(pg_catalog.pg_partition_root(c.conrelid), c.conrelid), fk.attname,
            c.confrelid, pk.attname)
           IN (('public.batch_items'::regclass, 'batch_id', 'public.batches'::regclass, 'id'),
               ('public.workflow_states'::regclass, 'item_id', 'public.batch_items'::regclass, 'id'),
               ('public.workflow_states'::regclass, 'batch_id', 'public.batches'::regclass, 'id'))
           AND cardinality(c.conkey) = 1 AS known
    FROM pg_catalog.pg_constraint c
    JOIN pg_catalog.pg_attribute fk ON fk.attrelid = c.conrelid AND fk.attnum = c.conkey[1]
    JOIN pg_catalog.pg_attribute pk ON pk.attrelid = c.confrelid AND pk.attnum = c.confkey[1]
    WHERE c.contype = 'f' AND c.conrelid IN (SELECT relid FROM rels)
)
SELECT NOT EXISTS (SELECT 1 FROM fks WHERE NOT fks.known)
   AND NOT EXISTS (
           SELECT 1 FROM pg_catalog.pg_trigger t
           WHERE t.tgrelid IN (SELECT relid FROM rels)
             AND t.tgenabled <> 'D'
             AND t.tgtype & 4 <> 0  -- fires on INSERT
             AND t.tgconstraint NOT IN (SELECT oid FROM fks WHERE fks.known))
   AND NOT EXISTS (
           SELECT 1 FROM pg_catalog.pg_rewrite r
           WHERE r.ev_class IN (SELECT relid FROM rels) AND r.ev_enabled <> 'D') AS safe,
       current_setting('session_replication_role') AS role;

-- batch_replication_role_replica --
-- For this transaction only, around the COPY and the states INSERT when
-- batch_fk_skip_is_safe said so. A plain SET LOCAL, tried in a savepoint: whether the role
-- may is known by trying (on Supabase supautils allows this statement to postgres, while
-- has_parameter_privilege and set_config say no).
SET LOCAL session_replication_role = replica;

-- batch_replication_role_restore --
-- Back to what it was (a literal composed by the caller: SET takes no bound parameter).
SET LOCAL session_replication_role = {};

-- batch_states_first_step --
-- One PENDING state per item for the first blueprint step. The items just copied have
-- the ids item_prefix || counter for counters 1..items (8 hex digits), so the states are
-- made from the counter alone, without reading batch_items back (the foreign key on
-- item_id still checks each one); each state id shares its item's counter under the
-- batch's state prefix, so the primary key grows at its end.
INSERT INTO public.workflow_states (id, item_id, batch_id, step_name, status)
SELECT (%(state_prefix)s || lpad(to_hex(g), 8, '0'))::uuid,
       (%(item_prefix)s || lpad(to_hex(g), 8, '0'))::uuid,
       %(batch_id)s, %(step)s, 'PENDING'
FROM generate_series(1::bigint, %(items)s::bigint) AS g;

-- batch_get --
-- One batch with its client's name (the columns of batches.BatchInfo).
SELECT b.id AS batch_id, b.client_id, c.name AS client, b.workstream_slug AS workstream,
       coalesce(b.blueprint, '{}') AS blueprint, b.status, b.created_at
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE b.id = %s;

-- batch_item_count --
-- Items of one batch (idx_batch_items_batch, migration 0005).
SELECT count(*) FROM public.batch_items WHERE batch_id = %s;

-- batch_state_counts --
-- States of one batch by step and status, whatever free-text status they carry.
SELECT step_name, status, count(*) AS n
FROM public.workflow_states
WHERE batch_id = %s
GROUP BY step_name, status
ORDER BY step_name, status;

-- batch_list --
-- Batches, newest first, optionally by client, by workstream, or only those without one
-- (the columns of batches.BatchInfo).
SELECT b.id AS batch_id, b.client_id, c.name AS client, b.workstream_slug AS workstream,
       coalesce(b.blueprint, '{}') AS blueprint, b.status, b.created_at
FROM public.batches b
JOIN public.clients c ON c.id = b.client_id
WHERE (%(client_id)s::uuid IS NULL OR b.client_id = %(client_id)s::uuid)
  AND (%(workstream)s::text IS NULL OR b.workstream_slug = %(workstream)s::text)
  AND (NOT %(missing)s::boolean OR b.workstream_slug IS NULL)
ORDER BY b.created_at DESC, b.id
LIMIT %(limit)s;

-- batch_lock --
-- Serialise cancels of one batch.
SELECT status FROM public.batches WHERE id = %s FOR UPDATE;

-- batch_cancel_states --
-- Waiting states never get dispatched: PENDING and BLOCKED become CANCELLED (in-flight ones finish).
UPDATE public.workflow_states
SET status = 'CANCELLED', updated_at = now(), claim_token = NULL, lease_expires_at = NULL
WHERE batch_id = %s AND status IN ('PENDING', 'BLOCKED');

-- batch_cancel --
-- The batch itself; a COMPLETED batch is refused before this runs.
UPDATE public.batches SET status = 'CANCELLED' WHERE id = %s AND status <> 'CANCELLED';

-- batch_in_flight --
-- States a cancel leaves to finish as they will.
SELECT count(*) FROM public.workflow_states
WHERE batch_id = %s AND status IN ('DISPATCHING', 'DISPATCHED');
