-- wsctl.complete_steps' batch-completion check read every batch item of the
-- whole table once per finishing batch: its "every item completed its last
-- step" NOT EXISTS over batch_items is planned (plpgsql's generic plan) as a
-- Hash Anti Join fed by a Seq Scan of batch_items, whatever the batch's size.
-- With 2,000,000 history states (500,000 items) that check took 0.2-0.7 s per
-- completing batch instead of ~50 ms (EXPLAIN (ANALYZE, BUFFERS) via
-- auto_explain, 1,000-item batch), and it grows with the table.
-- Reading the batch's items through a subquery fenced with OFFSET 0 keeps
-- them a per-batch index scan (idx_batch_items_batch, migration 0005); the
-- check's meaning is unchanged.
--
-- The function is patched in place rather than restated: the one fragment is
-- rewritten in whatever body the function has by now (other migrations may
-- have replaced it), and nothing is done when the fragment is not there.
-- CREATE OR REPLACE keeps the owner, the grants and the SET search_path.
DO $migration$
DECLARE
    fn regprocedure := to_regprocedure('wsctl.complete_steps(uuid[], uuid)');
    def text;
    patched text;
BEGIN
    IF fn IS NULL THEN
        RAISE NOTICE 'wsctl.complete_steps(uuid[], uuid) does not exist: nothing to patch';
        RETURN;
    END IF;
    def := pg_get_functiondef(fn);
    patched := regexp_replace(
        def,
        'FROM public\.batch_items i\s+WHERE i\.batch_id = b\.id\s+AND NOT EXISTS',
        'FROM (SELECT i.id FROM public.batch_items i WHERE i.batch_id = b.id OFFSET 0) i
              WHERE NOT EXISTS');
    IF patched = def THEN
        RAISE NOTICE 'wsctl.complete_steps: the batch-completion check is not the one this migration rewrites; left as it is';
        RETURN;
    END IF;
    EXECUTE patched;
END
$migration$;
