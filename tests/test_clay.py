"""Clay's webhook realities (wsctl.clay): the submission cap and rotation, record size,
and how answers are classified, against a real PostgreSQL and a loopback Clay stand-in."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from tests.support.clay_standin import ClayStandIn
from wsctl import clay


@pytest.fixture
def stand_in():
    s = ClayStandIn()
    yield s
    s.close()


def _send(conn, config, row, **kw):
    return clay.send(conn, config, row, post=lambda url, body: clay.http_post(url, body), **kw)


def _count(conn, entry) -> int | None:
    row = conn.execute(
        "SELECT submitted FROM wsctl.clay_webhooks WHERE digest = %s", (clay.digest(entry),)
    ).fetchone()
    return row[0] if row else None


def test_sources_rotate_at_the_cap_and_a_full_set_blocks_without_posting(conn, stand_in):
    urls = [f"{stand_in.url}/hook/A", f"{stand_in.url}/hook/B"]
    config = {"clay_table_webhook_urls": urls, "clay_webhook_submission_cap": 3}
    used = [_send(conn, config, {"n": n}).index for n in range(6)]
    assert used == [0, 0, 0, 1, 1, 1]
    assert [p for p, _ in stand_in.arrivals] == ["/hook/A"] * 3 + ["/hook/B"] * 3
    with pytest.raises(clay.WebhookCapacityExhausted) as err:
        _send(conn, config, {"n": 6}, where="(acme, enrich_company, apollo_scrape)")
    assert err.value.error_class == "operator" and err.value.reason_code == "clay_webhook_cap"
    assert "(acme, enrich_company, apollo_scrape) are at their submission cap" in str(err.value)
    assert "wsctl config set" in str(err.value)
    assert len(stand_in.arrivals) == 6  # never posted
    # The URLs are never stored: only their digests.
    stored = conn.execute("SELECT digest, submitted FROM wsctl.clay_webhooks").fetchall()
    assert sorted(stored) == sorted((hashlib.sha256(u.encode()).hexdigest(), 3) for u in urls)
    assert "hook" not in json.dumps([list(r) for r in stored])


def test_only_accepted_submissions_count(conn, stand_in):
    config = {"clay_table_webhook_url": f"{stand_in.url}/hook/A"}
    stand_in.answers = [(503, {}), (429, {"Retry-After": "7"}), (400, {})]
    with pytest.raises(clay.ClayAnswer) as e503:
        _send(conn, config, {"n": 1})
    assert (e503.value.error_class, e503.value.reason_code) == ("transient", "server_error")
    with pytest.raises(clay.ClayAnswer) as e429:
        _send(conn, config, {"n": 1})
    assert e429.value.error_class == "transient" and e429.value.retry_after == 7.0
    with pytest.raises(clay.ClayAnswer) as e400:
        _send(conn, config, {"n": 1})
    assert (e400.value.error_class, e400.value.reason_code) == ("permanent", "client_error")
    assert _count(conn, config["clay_table_webhook_url"]) == 0
    _send(conn, config, {"n": 1})
    assert _count(conn, config["clay_table_webhook_url"]) == 1


def test_an_unreachable_webhook_is_transient_and_not_counted(conn):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connection refused
    config = {"clay_table_webhook_url": f"http://127.0.0.1:{port}/hook"}
    with pytest.raises(clay.ClayError) as err:
        _send(conn, config, {"n": 1})
    assert err.value.error_class == "transient"
    assert config["clay_table_webhook_url"] not in str(err.value)  # the URL is a secret
    assert "unreachable" in str(err.value)
    assert _count(conn, config["clay_table_webhook_url"]) == 0


def test_a_record_over_100_kb_fails_before_sending(conn, stand_in):
    config = {"clay_table_webhook_url": f"{stand_in.url}/hook/A"}
    big = {"notes": "x" * 102_400}
    with pytest.raises(clay.RecordTooLarge) as err:
        _send(conn, config, big)
    assert err.value.error_class == "permanent"
    assert "102,412 bytes as sent" in str(err.value) and "at most 102,400" in str(err.value)
    assert stand_in.arrivals == [] and _count(conn, config["clay_table_webhook_url"]) is None
    small = {**config, "clay_max_record_bytes": 50}
    with pytest.raises(clay.RecordTooLarge):
        _send(conn, small, {"notes": "y" * 60})


def test_prior_submissions_count_and_secret_references_have_their_own_digest(conn, stand_in):
    url = f"{stand_in.url}/hook/A"
    assert clay.record_prior(conn, url, 44_999) == 44_999
    assert clay.record_prior(conn, url, 10) == 44_999  # never lowers the count
    config = {"clay_table_webhook_urls": [url, {"$secret": "CLAY_HOOK_B"}]}
    resolved = {"CLAY_HOOK_B": f"{stand_in.url}/hook/B"}

    def resolve(entry):
        return resolved[entry["$secret"]] if isinstance(entry, dict) else entry

    kw = {"post": lambda u, b: clay.http_post(u, b), "resolve": resolve}
    assert clay.send(conn, config, {"n": 1}, **kw).index == 0  # the 45,000th
    second = clay.send(conn, config, {"n": 2}, **kw)
    assert second.index == 1 and second.digest == hashlib.sha256(b"$secret:CLAY_HOOK_B").hexdigest()
    assert [p for p, _ in stand_in.arrivals] == ["/hook/A", "/hook/B"]


def test_concurrent_senders_never_exceed_the_cap(conn, db_url, stand_in):
    import psycopg

    config = {"clay_table_webhook_url": f"{stand_in.url}/hook/A", "clay_webhook_submission_cap": 25}
    results: list[str] = []

    def sender():
        with psycopg.connect(db_url, autocommit=True) as c:
            for _ in range(10):
                try:
                    _send(c, config, {"n": 1})
                    results.append("sent")
                except clay.WebhookCapacityExhausted:
                    results.append("full")

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("sent") == 25 and len(stand_in.arrivals) == 25
    assert _count(conn, config["clay_table_webhook_url"]) == 25


def test_doctor_warns_at_80_percent_of_a_webhook_cap(cli, conn, stand_in):
    from tests.support import factories as f

    acme = f.add_client(conn, "acme")
    url = f"{stand_in.url}/hook/SECRETPATH"
    step, ws = "enrich_company_via_waterfall_in_clay", "apollo_scrape"
    f.add_config(conn, acme, step, ws, {"clay_table_webhook_urls": [url]})

    def check():
        r = cli("doctor", "--json", "--backend", "local")
        return {c["name"]: c for c in r.json()["checks"]}["clay_webhooks"], r

    assert check()[0]["status"] == "OK"
    clay.record_prior(conn, url, 36_000)  # 80 % of 45,000
    found, r = check()
    assert found["status"] == "WARN" and f"acme/{step}/{ws}#0" in found["detail"]
    assert found["rows"][0]["left"] == 9_000
    assert "SECRETPATH" not in r.out + r.err
    clay.record_prior(conn, url, 45_000)
    assert "1 full (their states are BLOCKED)" in check()[0]["detail"]


def test_through_the_dispatcher_cap_size_and_retry_after_end_as_the_table_says(
    db_url, conn, stand_in
):
    """A pass over senders that use clay.send: the cap BLOCKS (nothing posted), a record
    over 100 KB FAILS with its size, and a 429's Retry-After is the backoff."""
    import psycopg

    from tests.support import factories as f
    from wsctl.dispatch import PassOptions, run_pass
    from wsctl.dispatch.memory import MemoryBackend

    step = "enrich_company_via_waterfall_in_clay"
    f.register(conn, step, "apollo_scrape", "async", "start_clay", "receive_clay")
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [step], 3)
    items = [r[0] for r in conn.execute(
        "SELECT item_id FROM workflow_states WHERE batch_id = %s ORDER BY item_id", (batch,)
    )]  # fmt: skip
    config = {"clay_table_webhook_url": f"{stand_in.url}/hook/A", "clay_webhook_submission_cap": 1}
    clay.record_prior(conn, config["clay_table_webhook_url"], 1)  # already at its cap
    big, capped, throttled = (str(i) for i in items)
    stand_in.answers = [(429, {"Retry-After": "90"})]

    def start_clay(item_id, workstream_slug=None):
        with psycopg.connect(db_url, autocommit=True) as c:
            if item_id == big:
                clay.send(c, {**config, "clay_webhook_submission_cap": 5},
                          {"blob": "x" * 200_000}, post=clay.http_post)  # fmt: skip
            elif item_id == capped:
                clay.send(c, config, {"item": item_id}, post=clay.http_post)
            else:
                clay.send(c, {**config, "clay_webhook_submission_cap": 5}, {"item": item_id},
                          post=clay.http_post)  # fmt: skip

    run_pass(conn, MemoryBackend({"start_clay": start_clay}), PassOptions())
    rows = {
        str(r[0]): r[1:]
        for r in conn.execute(
            "SELECT item_id, status, reason_code, last_error,"
            " extract(epoch FROM available_at - now()) FROM workflow_states"
        )
    }
    assert rows[capped][:2] == ("BLOCKED", "clay_webhook_cap")
    assert "at their submission cap" in rows[capped][2]
    assert rows[big][:2] == ("FAILED", "clay_record_too_large") and "bytes" in rows[big][2]
    assert rows[throttled][:2] == ("PENDING", "rate_limited")
    assert 80 < float(rows[throttled][3]) <= 91  # Retry-After 90 s as the backoff
    assert len(stand_in.times) == 1 and stand_in.arrivals == []  # only the throttled one posted


def test_config_set_submitted_records_earlier_submissions_of_added_urls(cli, conn):
    from tests.support import factories as f

    f.register(conn, "enrich_company_via_waterfall_in_clay", "apollo_scrape", "async", "s", "r")
    f.add_client(conn, "acme")
    base = ["config", "set", "--client", "acme", "--step",
            "enrich_company_via_waterfall_in_clay", "--workstream", "apollo_scrape"]  # fmt: skip
    a, b = "http://127.0.0.1:9/hook/A", "http://127.0.0.1:9/hook/B"
    r = cli(*base, "--set", f'clay_table_webhook_urls=["{a}"]', "--submitted", "44000")
    assert r.code == 0, r.err
    assert "recorded 44,000 earlier submission(s) for 1 added webhook URL(s)" in r.err
    assert _count(conn, a) == 44000
    # Adding a second URL counts only the new one; the first keeps its count.
    r = cli(*base, "--set", f'clay_table_webhook_urls=["{a}", "{b}"]', "--submitted", "10")
    assert r.code == 0, r.err
    assert (_count(conn, a), _count(conn, b)) == (44000, 10)
    # Nothing added: refused, and nothing written (the config is unchanged).
    before = conn.execute("SELECT config FROM client_workflow_configs").fetchone()
    r = cli(*base, "--set", "note=x", "--submitted", "5")
    assert r.code == 2 and "adds none" in r.err and len(r.err.strip().splitlines()) == 1
    assert conn.execute("SELECT config FROM client_workflow_configs").fetchone() == before
    r = cli(*base, "--set", f'clay_table_webhook_url="{a}x"', "--submitted", "-1")
    assert r.code == 2 and "zero or more" in r.err


def test_a_url_resolved_from_a_reference_is_counted_under_the_reference(conn, stand_in):
    """The dispatcher side (doctor, stats) sees `$secret:NAME`; the function sees the URL.
    Both count the same webhook."""
    from wsctl.secret_refs import resolve

    raw = {"clay_table_webhook_url": {"$secret": "CLAY_HOOK"}}
    config = resolve(raw, {"CLAY_HOOK": f"{stand_in.url}/hook/S"})
    assert config["clay_table_webhook_url"] == f"{stand_in.url}/hook/S"
    _send(conn, config, {"n": 1})
    assert _count(conn, raw["clay_table_webhook_url"]) == 1
    assert json.loads(json.dumps(config))["clay_table_webhook_url"].endswith("/hook/S")
