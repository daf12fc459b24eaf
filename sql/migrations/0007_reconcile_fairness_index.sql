-- wsctl:no-transaction
-- Reconciliation polls the least recently polled DISPATCHED calls first
-- (last_polled_at NULLS FIRST, then dispatched_at): this partial index serves
-- that order without a sort over every DISPATCHED row. Built concurrently:
-- workflow_states is the largest and busiest table; existing rows have
-- last_polled_at NULL and sort first, as never polled.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_reconcile_poll ON public.workflow_states (last_polled_at NULLS FIRST, dispatched_at) WHERE status = 'DISPATCHED' AND modal_call_id IS NOT NULL AND sender_returned_at IS NULL;
