-- clay_reserve --
-- Count one submission to a webhook while it is under its cap; no row when it is full.
INSERT INTO wsctl.clay_webhooks AS w (digest, submitted)
VALUES (%(digest)s, 1)
ON CONFLICT (digest) DO UPDATE
SET submitted = w.submitted + 1, updated_at = now()
WHERE w.submitted < %(cap)s
RETURNING submitted;

-- clay_release --
-- Take back a counted submission that Clay did not accept.
UPDATE wsctl.clay_webhooks
SET submitted = greatest(submitted - 1, 0), updated_at = now()
WHERE digest = %(digest)s;

-- clay_set_submitted --
-- Record how many submissions a webhook had before wsctl counted them (never lowers it).
INSERT INTO wsctl.clay_webhooks AS w (digest, submitted)
VALUES (%(digest)s, %(submitted)s)
ON CONFLICT (digest) DO UPDATE
SET submitted = greatest(w.submitted, EXCLUDED.submitted), updated_at = now()
RETURNING submitted;

-- clay_counts --
-- Submissions counted per webhook digest.
SELECT digest, submitted, updated_at
FROM wsctl.clay_webhooks
WHERE digest = ANY (%(digests)s);

-- clay_configs_with_webhooks --
-- Client configs that name Clay webhook URLs (for doctor's capacity check).
SELECT c.name AS client, cfg.workflow_slug AS step, cfg.workstream_slug AS workstream,
       cfg.config
FROM public.client_workflow_configs cfg
JOIN public.clients c ON c.id = cfg.client_id
WHERE cfg.config ? 'clay_table_webhook_urls' OR cfg.config ? 'clay_table_webhook_url';
