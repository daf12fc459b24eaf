-- wsctl:no-transaction
-- batch_items.batch_id is a foreign key without an index: counting a batch's
-- items (`wsctl batch status`, a deduplicated `batch create`), the completion
-- check in wsctl.complete_steps and ON DELETE CASCADE from batches each read
-- the whole table without it. Built concurrently: batch_items is large and busy.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_batch_items_batch ON public.batch_items (batch_id);
