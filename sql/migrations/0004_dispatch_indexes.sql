-- wsctl:no-transaction
-- Indexes for the dispatcher's claim, for per-batch counts and the batch
-- completion probe (batch_id, status), and for items by batch (an unindexed
-- foreign key until now). Built concurrently: these tables are the largest
-- and busiest.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_pending ON public.workflow_states (available_at) WHERE status = 'PENDING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_lease ON public.workflow_states (lease_expires_at) WHERE status = 'DISPATCHING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_batch_status ON public.workflow_states (batch_id, status, step_name);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_batch_items_batch ON public.batch_items (batch_id);
