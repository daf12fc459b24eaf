-- Clay webhook sources accept at most 50,000 submissions in their lifetime (deleted rows
-- included), then stop accepting, silently. wsctl counts the accepted submissions per
-- webhook, keyed by a digest of the URL: the URL carries a secret, so it is never stored.
CREATE TABLE IF NOT EXISTS wsctl.clay_webhooks (
    digest      text PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'),
    submitted   bigint NOT NULL DEFAULT 0 CHECK (submitted >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON wsctl.clay_webhooks FROM PUBLIC;
