-- Every statement the example enrichment worker (enrichment_logic.py) sends.
-- Same named-block format as wsctl's sql/queries; parameters always bound.

-- example_item_get --
-- An item with its batch's client and workstream, and its data.
SELECT bi.id, b.client_id, b.workstream_slug, bi.data
FROM public.batch_items bi
JOIN public.batches b ON b.id = bi.batch_id
WHERE bi.id = %s;

-- example_config_row --
-- The client config row the composite key (workflow, workstream) picks for an item (for the trace).
SELECT cwc.id, cwc.workstream_slug
FROM public.batch_items bi
JOIN public.batches b ON b.id = bi.batch_id
JOIN public.client_workflow_configs cwc ON cwc.client_id = b.client_id
WHERE bi.id = %s AND cwc.workflow_slug = %s AND cwc.workstream_slug = %s;

-- example_item_record_step --
-- Merge normalized values into data.normalized and set data._trace[step] (one row lock).
UPDATE public.batch_items
SET data = data
    || jsonb_build_object('normalized',
                          coalesce(data -> 'normalized', '{}'::jsonb) || %(normalized)s::jsonb)
    || jsonb_build_object('_trace',
                          coalesce(data -> '_trace', '{}'::jsonb)
                          || jsonb_build_object(%(step)s::text, %(trace)s::jsonb))
WHERE id = %(item_id)s;

-- example_clay_send_claim --
-- Claim the one POST of the state's current dispatch generation while it waits to be sent
-- (waiting: DISPATCHING, or DISPATCHED when the pass recorded the spawn first): only the first
-- sender of a generation gets a row back. Committed before the POST.
INSERT INTO enrichment_example.clay_sends (state_id, dispatch_generation, item_id, step_name)
SELECT ws.id, ws.dispatch_generation, ws.item_id, ws.step_name
FROM public.workflow_states ws
WHERE ws.item_id = %(item_id)s
  AND ws.step_name = %(step)s
  AND ws.status = ANY (%(waiting)s::text[])
ON CONFLICT (state_id, dispatch_generation) DO NOTHING
RETURNING state_id, dispatch_generation;

-- example_clay_send_existing --
-- Why no claim came back: the state (if any), and its current generation's send (if any).
SELECT ws.id AS state_id, ws.status, ws.dispatch_generation,
       cs.state_id IS NOT NULL AS claimed, cs.posted_at, cs.http_status, cs.error
FROM public.workflow_states ws
LEFT JOIN enrichment_example.clay_sends cs
       ON cs.state_id = ws.id AND cs.dispatch_generation = ws.dispatch_generation
WHERE ws.item_id = %(item_id)s AND ws.step_name = %(step)s;

-- example_clay_send_posted --
-- The POST of one generation was answered 2xx, by the webhook source of that digest.
UPDATE enrichment_example.clay_sends
SET posted_at = now(), http_status = %(http_status)s, webhook_digest = %(webhook_digest)s,
    error = NULL
WHERE state_id = %(state_id)s AND dispatch_generation = %(generation)s;

-- example_clay_send_failed --
-- The POST of one generation failed (the step is retried, with a new generation).
UPDATE enrichment_example.clay_sends
SET error = %(error)s
WHERE state_id = %(state_id)s AND dispatch_generation = %(generation)s;

-- example_callback_fence --
-- The fence of a verified callback: the state, locked until its payload is recorded and it
-- completes, only while the token's generation is its current one and it waits for it
-- (waiting: DISPATCHING, or DISPATCHED).
-- FOR UPDATE re-checks the WHERE on the newest row version after any wait, so a claim or a
-- retry committed meanwhile leaves nothing to complete; a claim waits for this lock.
SELECT id, item_id, step_name
FROM public.workflow_states
WHERE id = %(state_id)s
  AND dispatch_generation = %(generation)s
  AND status = ANY (%(waiting)s::text[])
  AND (%(steps)s::text[] IS NULL OR step_name = ANY (%(steps)s::text[]))
FOR UPDATE;

-- example_callback_state --
-- Why a verified callback was refused (read only, for the answer): the state as it is now.
SELECT id, step_name, status, dispatch_generation
FROM public.workflow_states
WHERE id = %s;

-- example_item_record_clay --
-- Record Clay's enriched payload on the item under data.clay[step].
UPDATE public.batch_items
SET data = data || jsonb_build_object('clay',
                                      coalesce(data -> 'clay', '{}'::jsonb)
                                      || jsonb_build_object(%s::text, %s::jsonb))
WHERE id = %s;

-- example_company_upsert --
-- One company per (client, company key); a later row fills what earlier ones lacked.
INSERT INTO enrichment_example.companies
    (client_id, company_key, name, domain, linkedin_url, employees, annual_revenue,
     industry, country, source)
VALUES (%(client_id)s, %(company_key)s, %(name)s, %(domain)s, %(linkedin_url)s, %(employees)s,
        %(annual_revenue)s, %(industry)s, %(country)s, %(source)s)
ON CONFLICT (client_id, company_key) DO UPDATE
SET domain = coalesce(companies.domain, EXCLUDED.domain),
    linkedin_url = coalesce(companies.linkedin_url, EXCLUDED.linkedin_url),
    employees = coalesce(EXCLUDED.employees, companies.employees),
    annual_revenue = coalesce(EXCLUDED.annual_revenue, companies.annual_revenue),
    industry = coalesce(companies.industry, EXCLUDED.industry),
    country = coalesce(companies.country, EXCLUDED.country),
    updated_at = now()
RETURNING id;

-- example_person_upsert --
-- One person per raw item; splitting the same item again updates the row in place.
INSERT INTO enrichment_example.people
    (item_id, client_id, company_id, workstream_slug, first_name, last_name, full_name, title,
     seniority, department, email, email_status, linkedin_url, city, country, source, raw)
VALUES (%(item_id)s, %(client_id)s, %(company_id)s, %(workstream_slug)s, %(first_name)s,
        %(last_name)s, %(full_name)s, %(title)s, %(seniority)s, %(department)s, %(email)s,
        %(email_status)s, %(linkedin_url)s, %(city)s, %(country)s, %(source)s, %(raw)s)
ON CONFLICT (item_id) DO UPDATE
SET company_id = EXCLUDED.company_id,
    workstream_slug = EXCLUDED.workstream_slug,
    first_name = EXCLUDED.first_name,
    last_name = EXCLUDED.last_name,
    full_name = EXCLUDED.full_name,
    title = EXCLUDED.title,
    seniority = EXCLUDED.seniority,
    department = EXCLUDED.department,
    email = EXCLUDED.email,
    email_status = EXCLUDED.email_status,
    linkedin_url = EXCLUDED.linkedin_url,
    city = EXCLUDED.city,
    country = EXCLUDED.country,
    source = EXCLUDED.source,
    raw = EXCLUDED.raw,
    updated_at = now()
RETURNING id;
