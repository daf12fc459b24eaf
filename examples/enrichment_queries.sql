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

-- example_state_for_step --
-- An item's workflow state for one step (the Clay sender signs its id).
SELECT id, status
FROM public.workflow_states
WHERE item_id = %s AND step_name = %s;

-- example_callback_state_lock --
-- The state a verified callback names, locked until its payload is recorded and it completes.
SELECT id, item_id, step_name, status
FROM public.workflow_states
WHERE id = %s
FOR UPDATE;

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
