-- wsctl:no-transaction
-- Indexes for `wsctl stats` and `wsctl ui` on the largest, busiest table, built concurrently
-- (no write is blocked; an existing database is adopted as it is):
-- * updated_at: every write of a state sets it, so the states dispatched, completed or failed
--   in the last hour are all among those it finds for "updated in the last hour";
-- * the BLOCKED and FAILED states (few), grouped by reason code and error class from the index
--   alone, without a scan of the rest.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_updated_at ON public.workflow_states (updated_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_workflow_states_needs_operator ON public.workflow_states (batch_id, step_name, status, reason_code, error_class) WHERE status IN ('BLOCKED', 'FAILED');
