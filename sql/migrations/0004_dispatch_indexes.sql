-- wsctl:no-transaction
-- Indexes for the dispatcher's claim, and for per-batch counts and the batch
-- completion probe (batch_id, status). Built concurrently: workflow_states is
-- the largest and busiest table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_pending ON public.workflow_states (available_at) WHERE status = 'PENDING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_lease ON public.workflow_states (lease_expires_at) WHERE status = 'DISPATCHING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_batch_status ON public.workflow_states (batch_id, status, step_name);
