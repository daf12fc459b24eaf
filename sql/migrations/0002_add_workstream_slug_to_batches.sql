-- wsctl:no-transaction
-- The seed's migration `add_workstream_slug_to_batches`. Non-transactional so
-- the index is built CONCURRENTLY (production batches tables are large and
-- busy). Both statements are IF NOT EXISTS: databases that already ran the
-- seed's SQL by hand are adopted as they are. The column stays nullable
-- (`wsctl backfill workstream-slug --enforce` adds the NOT NULL check later).
ALTER TABLE public.batches ADD COLUMN IF NOT EXISTS workstream_slug text;
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_batches_workstream_slug ON public.batches (workstream_slug);
