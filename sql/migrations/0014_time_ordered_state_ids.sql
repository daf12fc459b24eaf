-- Time-ordered ids for rows inserted without one: the states complete_steps
-- enqueues, and whatever the dashboard inserts. gen_random_uuid() scatters
-- each new state over the whole of workflow_states_pkey (and a random item id
-- over the (item_id, step_name) index); once those indexes outgrow memory,
-- every state update that a claim or a completion makes reads and dirties
-- about two index leaf pages of its own (EXPLAIN (ANALYZE, BUFFERS) of a
-- 1,000-row claim with 2,000,000 history states: ~1,600 pages read, ~1,900
-- dirtied; with time-ordered ids: ~26 read, ~70 dirtied, as on a fresh table).
-- A UUIDv7 (RFC 9562: 48-bit Unix milliseconds, version 7, random rest) keeps
-- a batch's rows next to each other in both indexes. `wsctl batch create`
-- already writes such ids itself.
--
-- The default is an expression over built-in functions only (no wsctl
-- function): every role that inserts today (the dashboard's included) keeps
-- working without a grant. SET DEFAULT is a catalog change: no rewrite, no
-- scan, existing ids stay as they are; the brief ACCESS EXCLUSIVE lock is
-- bounded by the runner's --ddl-lock-timeout.

ALTER TABLE public.workflow_states
    ALTER COLUMN id SET DEFAULT (encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid);

ALTER TABLE public.batch_items
    ALTER COLUMN id SET DEFAULT (encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid);
