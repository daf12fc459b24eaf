-- wsctl:no-transaction
-- Indexes for the dispatcher's claim, for per-batch counts and the batch
-- completion probe (batch_id, status), and for reconciliation and callback
-- timeouts over DISPATCHED rows. Built concurrently: workflow_states is
-- the largest and busiest table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_pending ON public.workflow_states (available_at) WHERE status = 'PENDING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_claim_lease ON public.workflow_states (lease_expires_at) WHERE status = 'DISPATCHING';
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_batch_status ON public.workflow_states (batch_id, status, step_name);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_dispatched ON public.workflow_states (dispatched_at) WHERE status = 'DISPATCHED';
