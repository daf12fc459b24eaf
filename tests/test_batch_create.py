"""wsctl batch create against a real PostgreSQL: one transaction, streamed COPY, every refusal writes nothing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import table_snapshot, url_for
from tests.support.commands import wsctl_argv
from wsctl import batches, db, itemfiles
from wsctl import settings as wsctl_settings
from wsctl.errors import OperationalError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APOLLO = EXAMPLES / "apollo_export_sample.csv"
BLUEPRINT = (
    "normalize_all_core_values,split_raw_apollo_scrape_data,enrich_company_via_waterfall_in_clay"
)


def seed_catalog(conn: psycopg.Connection) -> dict[str, uuid.UUID]:
    """Clients, registry rows and configs, with direct SQL (the catalog commands are not needed).

    apollo_scrape registers the three BLUEPRINT steps; inbound registers only the first.
    acme has configs for the first two steps in apollo_scrape; globex has none.
    """
    ids = {}
    for name in ("acme", "globex"):
        ids[name] = conn.execute(
            "INSERT INTO public.clients (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()[0]
    for ws, steps in {
        "apollo_scrape": BLUEPRINT.split(","),
        "inbound": ["normalize_all_core_values"],
    }.items():
        for step in steps:
            conn.execute(
                "INSERT INTO public.enrichment_registry (slug, workstream_slug, type, modal_sender_fn)"
                " VALUES (%s, %s, 'sync', %s)",
                (step, ws, f"run_{step}"),
            )
    for step in BLUEPRINT.split(",")[:2]:
        conn.execute(
            "INSERT INTO public.client_workflow_configs (client_id, workflow_slug, workstream_slug, config)"
            " VALUES (%s, %s, 'apollo_scrape', '{}')",
            (ids["acme"], step),
        )
    return ids


@pytest.fixture
def catalog(conn):
    return seed_catalog(conn)


def create_args(items: str | Path, *extra: str, client="acme", workstream="apollo_scrape"):
    return (
        "batch",
        "create",
        "--client",
        client,
        "--workstream",
        workstream,
        "--blueprint",
        BLUEPRINT,
        "--items",
        str(items),
        *extra,
    )


def stored_items(conn: psycopg.Connection, batch_id) -> list:
    """A batch's items' data, in id (= file) order."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT data FROM public.batch_items WHERE batch_id = %s ORDER BY id", (batch_id,)
        )
    ]


def write_csv(path: Path, n: int, *, bad_at_row: int | None = None) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company", "domain", "n"])
        for i in range(1, n + 1):
            if i == bad_at_row:
                f.write('broken,"quote"x,1\n')
            else:
                w.writerow([f"Company {i}, Inc.", f"c{i}.example", str(i)])
    return path


# --- the happy paths ------------------------------------------------------------


def test_create_from_the_apollo_export_writes_batch_items_and_first_states(cli, conn, catalog):
    r = cli(*create_args(APOLLO, "--json"))
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["items"] == 200
    assert doc["workstream"] == "apollo_scrape"
    assert doc["blueprint"] == BLUEPRINT.split(",")
    assert doc["deduplicated"] is False and doc["dry_run"] is False
    bid = uuid.UUID(doc["batch_id"])
    # acme has no config for the third step in apollo_scrape: one warning, on stderr.
    assert "no config for step enrich_company_via_waterfall_in_clay" in r.err
    assert "normalize_all_core_values in" not in r.err

    row = conn.execute(
        "SELECT client_id, blueprint, status, workstream_slug FROM public.batches WHERE id = %s",
        (bid,),
    ).fetchone()
    assert row == (catalog["acme"], BLUEPRINT.split(","), "PENDING", "apollo_scrape")

    with APOLLO.open(newline="", encoding="utf-8-sig") as f:
        expected = list(csv.DictReader(f))
    got = stored_items(conn, bid)
    # Every value stays a string, "" included, in file order (ids follow the file).
    assert got == expected
    assert got[0]["# Employees"] == "1,200" and got[0]["Email"] == ""

    states = conn.execute(
        "SELECT s.step_name, s.status, count(*) FROM public.workflow_states s"
        " JOIN public.batch_items i ON i.id = s.item_id AND i.batch_id = s.batch_id"
        " WHERE s.batch_id = %s GROUP BY 1, 2",
        (bid,),
    ).fetchall()
    assert states == [("normalize_all_core_values", "PENDING", 200)]


def test_item_ids_are_uuid7_and_contiguous(cli, conn, catalog):
    r = cli(*create_args(EXAMPLES / "items.csv", "--json"))
    assert r.code == 0, r.err
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM public.batch_items WHERE batch_id = %s ORDER BY id",
            (r.json()["batch_id"],),
        )
    ]
    assert len(ids) == 5
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert [i.int - ids[0].int for i in ids] == [0, 1, 2, 3, 4]
    data = conn.execute("SELECT data FROM public.batch_items WHERE id = %s", (ids[4],)).fetchone()[
        0
    ]
    assert data["Company"] == 'Initech "Labs"'
    assert data["Title"] == "Software Engineer\n(TPS reports)"


def test_create_from_jsonl_keeps_json_types_and_skips_blank_lines(cli, conn, catalog):
    r = cli(*create_args(EXAMPLES / "items.jsonl", "--json"))
    assert r.code == 0, r.err
    assert r.json()["items"] == 4
    rows = stored_items(conn, r.json()["batch_id"])
    assert rows[0]["tags"] == ["saas", "b2b"] and rows[0]["# Employees"] == 5000
    assert rows[1]["hq"] == {"city": "Gotham", "country": "US"}
    assert rows[2]["# Employees"] is None and rows[2]["public"] is False
    assert rows[3]["Company"] == "Société Générale" and rows[3]["note"] == "UTF-8 ✓"


def test_stdin_with_a_byte_order_mark_and_explicit_format(cli, conn, catalog):
    text = "\ufeffcompany,domain\nAcme,acme.com\nGlobex,globex.com\n"
    r = cli(*create_args("-", "--format", "csv", "--json"), stdin=text)
    assert r.code == 0, r.err
    assert r.json()["items"] == 2
    keys = conn.execute(
        "SELECT DISTINCT jsonb_object_keys(data) FROM public.batch_items"
    ).fetchall()
    assert sorted(k[0] for k in keys) == ["company", "domain"]


def test_a_subprocess_reads_binary_stdin(db_url, conn, catalog, tmp_path):
    """The installed command as a subprocess: real stdin bytes, BOM and CRLF line ends."""
    data = "\ufeffcompany,domain\r\nAcme,acme.com\r\n\r\nGlobex,globex.com\r\n".encode()
    env = {**os.environ, "WSCTL_DATABASE_URL": db_url}
    args = create_args("-", "--format", "csv", "--json")
    proc = subprocess.run(wsctl_argv(None, *args), input=data, capture_output=True, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["items"] == 2
    got = {
        r[0]["company"]: r[0]["domain"] for r in conn.execute("SELECT data FROM public.batch_items")
    }
    assert got == {"Acme": "acme.com", "Globex": "globex.com"}


def test_dry_run_parses_everything_and_writes_nothing(cli, conn, catalog):
    before = table_snapshot(conn)
    r = cli(*create_args(APOLLO, "--dry-run", "--json"))
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["dry_run"] is True and doc["batch_id"] is None and doc["items"] == 200
    assert table_snapshot(conn) == before

    r = cli(*create_args(APOLLO, "--dry-run"))
    assert r.code == 0 and "would create a batch of 200 items" in r.out


def test_dry_run_still_refuses_a_bad_file(cli, conn, catalog, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", 10, bad_at_row=7)
    before = table_snapshot(conn)
    r = cli(*create_args(bad, "--dry-run"))
    assert r.code == 1
    assert "bad.csv line 8" in r.err
    assert table_snapshot(conn) == before


# --- refusals: one line, exit code, nothing written -------------------------------


def _bytes_file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD_FILES = [
    ("quote.csv", b'a,b\n1,2\n3,"x"y\n', "line 3", "bad CSV"),
    ("unclosed.csv", b'a,b\n1,2\n3,"never closed\n4,5\n', "line 4", "bad CSV"),
    ("fields.csv", b"a,b,c\n1,2,3\n4,5\n", "line 3", "2 fields where the header has 3"),
    ("toomany.csv", b"a,b\n1,2\n\n1,2,3\n", "line 4", "3 fields where the header has 2"),
    ("empty.csv", b"", "empty file", "no header"),
    ("bom_only.csv", b"\xef\xbb\xbf", "empty file", "no header"),
    ("header_only.csv", b"a,b\n", "empty file", "only a header"),
    ("dup.csv", b"a,b,a\n1,2,3\n", "line 1", "duplicate column name 'a'"),
    ("latin1.csv", b"a,b\n1,2\ncaf\xe9,3\n", "line 3", "not valid UTF-8"),
    ("nul.csv", b"a,b\n1,x\x00y\n", "line 2", "NUL"),
    ("bad.jsonl", b'{"a": 1}\n{"a": \n', "line 2", "invalid JSON"),
    ("array.jsonl", b'{"a": 1}\n\n[1, 2]\n', "line 3", "expected a JSON object, got an array"),
    ("scalar.jsonl", b'"just a string"\n', "line 1", "got a string"),
    ("nan.jsonl", b'{"a": NaN}\n', "line 1", "NaN is not valid JSON"),
    ("nulesc.jsonl", b'{"a": "x\\u0000y"}\n', "line 1", "\\u0000"),
    ("surrogate.jsonl", b'{"a": "\\ud800"}\n', "line 1", "surrogate"),
    ("surrogate_key.jsonl", b'{"a": 1}\n{"\\udc00": 1}\n', "line 2", "surrogate"),
    ("blank.jsonl", b"\n  \n", "empty file", "no items"),
]


@pytest.mark.parametrize(
    ("name", "data", "where", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_malformed_item_files_are_refused_with_the_line(
    cli, conn, catalog, tmp_path, name, data, where, reason
):
    path = _bytes_file(tmp_path, name, data)
    before = table_snapshot(conn)
    r = cli(*create_args(path))
    assert r.code == 1, r.out
    err = r.err.strip()
    assert err.startswith("wsctl: error:") and len(err.splitlines()) == 1, err
    assert where in err and reason in err, err
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"client": "nobody"}, 1, "no client named or with id 'nobody'"),
        ({"workstream": "outbound"}, 1, "known workstreams: apollo_scrape, inbound"),
        ({"workstream": "Bad Slug"}, 1, "invalid workstream"),
        (
            {"workstream": "inbound"},
            1,
            "not registered in workstream inbound: split_raw_apollo_scrape_data, "
            "enrich_company_via_waterfall_in_clay",
        ),
    ],
)
def test_option_refusals_write_nothing(cli, conn, catalog, kwargs, code, message):
    before = table_snapshot(conn)
    r = cli(*create_args(APOLLO, **kwargs))
    assert r.code == code
    assert message in r.err
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    ("blueprint", "message"),
    [
        ("a,,b", "empty step"),
        ("normalize_all_core_values,normalize_all_core_values", "repeats step"),
        (" ", "blueprint is empty"),
        ("Not_A_Slug", "invalid blueprint step"),
    ],
)
def test_bad_blueprints_are_refused(cli, conn, catalog, blueprint, message):
    before = table_snapshot(conn)
    args = list(create_args(APOLLO))
    args[args.index("--blueprint") + 1] = blueprint
    r = cli(*args)
    assert r.code == 1 and message in r.err
    assert table_snapshot(conn) == before


def test_unknown_format_and_missing_file(cli, conn, catalog, tmp_path):
    before = table_snapshot(conn)
    r = cli(*create_args(tmp_path / "items.xlsx"))
    assert r.code == 2 and "cannot tell the format" in r.err
    r = cli(*create_args("-"), stdin="a\n1\n")
    assert r.code == 2 and "--format" in r.err
    r = cli(*create_args(tmp_path / "items.csv", "--format", "xml"))
    assert r.code == 2 and "unknown item format" in r.err
    r = cli(*create_args(tmp_path / "nope.csv"))
    assert r.code == 1 and "no such item file" in r.err
    assert table_snapshot(conn) == before


def test_a_bad_row_at_line_50001_writes_nothing(cli, conn, catalog, tmp_path):
    """The first 49,999 rows are already in the COPY stream when row 50,000 fails."""
    path = write_csv(tmp_path / "big.csv", 60_000, bad_at_row=50_000)
    before = table_snapshot(conn)
    r = cli(*create_args(path))
    assert r.code == 1
    assert "big.csv line 50001: bad CSV" in r.err
    assert table_snapshot(conn) == before
    assert conn.execute("SELECT count(*) FROM wsctl.batch_dedupe_keys").fetchone()[0] == 0


def test_a_row_postgresql_rejects_rolls_everything_back(conn, catalog, tmp_path):
    """Belt and braces: whatever fails inside the transaction leaves nothing behind."""
    path = write_csv(tmp_path / "ok.csv", 3000)
    before = table_snapshot(conn)
    with pytest.raises(OperationalError):
        batches.create_batch(
            conn,
            client="acme",
            workstream="apollo_scrape",
            blueprint=BLUEPRINT,
            items=path,
            on_progress=lambda n, b: (_ for _ in ()).throw(OperationalError("stop")),
        )
    assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("items.csv", 'company,n\nA,1\n"multi\nline",2\n"",3\n', "items.csv line 5"),
        ("items.jsonl", '{"company": "A"}\n\n{"company": ""}\n', "items.jsonl line 3"),
    ],
)
def test_an_item_a_dashboard_check_refuses_is_named_by_its_line(
    cli, conn, catalog, tmp_path, name, text, where
):
    """A CHECK the dashboard added on batch_items refuses an item during the COPY: the
    error names the item's line in the file (a quoted CSV value can span lines)."""
    conn.execute(
        "ALTER TABLE public.batch_items ADD CONSTRAINT company_given"
        " CHECK (coalesce(data->>'company', 'x') <> '')"
    )
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    before = table_snapshot(conn)
    r = cli(*create_args(path))
    assert r.code == 1
    assert r.err.strip().splitlines() == [
        f"wsctl: error: {where}: PostgreSQL refused the item: new row for relation"
        ' "batch_items" violates check constraint "company_given"'
    ]
    assert table_snapshot(conn) == before
    r = cli(*create_args("-", "--format", name.rsplit(".", 1)[1]), stdin=text)
    assert r.code == 1 and "stdin item" in r.err  # stdin cannot be read twice: its item number
    assert table_snapshot(conn) == before


# --- dedupe ----------------------------------------------------------------------


def test_dedupe_key_returns_the_existing_batch(cli, conn, catalog):
    first = cli(*create_args(APOLLO, "--dedupe-key", "import-2026-01-01", "--json"))
    assert first.code == 0, first.err
    snap = table_snapshot(conn)
    again = cli(*create_args(APOLLO, "--dedupe-key", "import-2026-01-01", "--json"))
    assert again.code == 0, again.err
    a, b = first.json(), again.json()
    assert set(a) == set(b)
    assert b["batch_id"] == a["batch_id"] and b["items"] == 200 and b["deduplicated"] is True
    assert "already made batch" in again.err
    assert table_snapshot(conn) == snap

    # The same key for a different request is a mistake, not a retry.
    r = cli(*create_args(APOLLO, "--dedupe-key", "import-2026-01-01", client="globex"))
    assert r.code == 1 and "already names batch" in r.err
    assert table_snapshot(conn) == snap


def test_two_concurrent_creates_with_one_key_make_one_batch(db_url, conn, catalog, tmp_path):
    path = write_csv(tmp_path / "items.csv", 30_000)
    results: list = []
    errors: list = []
    barrier = threading.Barrier(2)

    def run():
        s = wsctl_settings.Settings(database_url=db_url, url_source="test")
        try:
            with db.connect(db_url, s) as c:
                barrier.wait()
                results.append(
                    batches.create_batch(
                        c,
                        client="acme",
                        workstream="apollo_scrape",
                        blueprint=BLUEPRINT,
                        items=path,
                        dedupe_key="same-key",
                    )
                )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2
    assert results[0].batch_id == results[1].batch_id
    assert sorted(r.deduplicated for r in results) == [False, True]
    assert all(r.items == 30_000 for r in results)
    assert conn.execute("SELECT count(*) FROM public.batches").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM public.batch_items").fetchone()[0] == 30_000
    assert conn.execute("SELECT count(*) FROM public.workflow_states").fetchone()[0] == 30_000


def test_dedupe_key_must_not_be_blank(cli, conn, catalog):
    before = table_snapshot(conn)
    r = cli(*create_args(APOLLO, "--dedupe-key", "  "))
    assert r.code == 1 and "dedupe key is empty" in r.err
    assert table_snapshot(conn) == before


# --- foreign-key checks by construction ---------------------------------------------


def create_lib(conn, items=None, **kwargs):
    return batches.create_batch(
        conn,
        client="acme",
        workstream="apollo_scrape",
        blueprint=BLUEPRINT,
        items=items or EXAMPLES / "items.csv",
        **kwargs,
    )


def assert_consistent(conn, batch_id, n):
    """What the skipped foreign-key checks would have checked, checked here by query."""
    assert conn.execute(
        "SELECT count(*) FROM public.batch_items i JOIN public.batches b ON b.id = i.batch_id"
        " WHERE i.batch_id = %s",
        (batch_id,),
    ).fetchone() == (n,)
    assert conn.execute(
        "SELECT count(*) FROM public.workflow_states s"
        " JOIN public.batch_items i ON i.id = s.item_id AND i.batch_id = s.batch_id"
        " JOIN public.batches b ON b.id = s.batch_id"
        " WHERE s.batch_id = %s AND s.status = 'PENDING'",
        (batch_id,),
    ).fetchone() == (n,)


def test_a_superuser_create_skips_the_per_row_fk_triggers_and_stays_consistent(conn, catalog):
    result = create_lib(conn)
    assert result.fk_checks == "by_construction"
    assert_consistent(conn, result.batch_id, 5)
    # SET LOCAL: the session's role setting is untouched after the transaction.
    assert conn.execute("SHOW session_replication_role").fetchone()[0] == "origin"
    checked = create_lib(conn, fk_checks="server")
    assert checked.fk_checks == "server"
    assert_consistent(conn, checked.batch_id, 5)
    same = (
        "SELECT array_agg(data ORDER BY id) FROM public.batch_items WHERE batch_id = %s",
        "SELECT array_agg((step_name, status) ORDER BY id) FROM public.workflow_states"
        " WHERE batch_id = %s",
    )
    for query in same:
        assert (
            conn.execute(query, (result.batch_id,)).fetchone()
            == conn.execute(query, (checked.batch_id,)).fetchone()
        )


def test_the_json_says_which_checks_ran(cli, catalog):
    r = cli(*create_args(EXAMPLES / "items.csv", "--json"))
    assert r.code == 0, r.err
    assert r.json()["fk_checks"] == "by_construction"
    r = cli(*create_args(EXAMPLES / "items.csv", "--check-every-row", "--json"))
    assert r.code == 0, r.err
    assert r.json()["fk_checks"] == "server"
    r = cli(*create_args(EXAMPLES / "items.csv", "--dry-run", "--json"))
    assert r.json()["fk_checks"] is None


def add_state_log_trigger(conn, table: str = "public.workflow_states") -> None:
    """A dashboard-style trigger: every inserted state is logged in public.state_log."""
    conn.execute(f"""
        CREATE TABLE public.state_log (item_id uuid);
        CREATE FUNCTION public.log_state() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.state_log VALUES (NEW.item_id); RETURN NEW; END $$;
        CREATE TRIGGER dashboard_log AFTER INSERT ON {table}
            FOR EACH ROW EXECUTE FUNCTION public.log_state();
    """)


def test_a_user_trigger_keeps_every_check_and_fires_for_every_row(conn, catalog):
    add_state_log_trigger(conn)
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert conn.execute("SELECT count(*) FROM public.state_log").fetchone()[0] == 5
    assert_consistent(conn, result.batch_id, 5)
    # A trigger set to fire ALWAYS would fire, but its own writes would run under the
    # replica role (their foreign keys unchecked): not taken either.
    conn.execute("ALTER TABLE public.workflow_states ENABLE ALWAYS TRIGGER dashboard_log")
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert conn.execute("SELECT count(*) FROM public.state_log").fetchone()[0] == 10
    # A REPLICA trigger would fire only under the skip: not taken.
    conn.execute("ALTER TABLE public.workflow_states ENABLE REPLICA TRIGGER dashboard_log")
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert conn.execute("SELECT count(*) FROM public.state_log").fetchone()[0] == 10
    # A disabled one fires under neither.
    conn.execute("ALTER TABLE public.workflow_states DISABLE TRIGGER dashboard_log")
    assert create_lib(conn).fk_checks == "by_construction"


def test_an_update_only_trigger_does_not_keep_the_checks(conn, catalog):
    """The dashboard's usual updated_at trigger fires on UPDATE, never on a create's INSERT."""
    conn.execute("""
        CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.updated_at = now(); RETURN NEW; END $$;
        CREATE TRIGGER touch BEFORE UPDATE ON public.workflow_states
            FOR EACH ROW EXECUTE FUNCTION public.touch();
    """)
    assert create_lib(conn).fk_checks == "by_construction"


def test_a_deferrable_constraint_keeps_every_check(conn, catalog):
    """Its re-check is an internal INSERT trigger, which the replica role would skip too."""
    conn.execute(
        "ALTER TABLE public.workflow_states"
        " ADD CONSTRAINT states_once UNIQUE (item_id, step_name, status) DEFERRABLE"
    )
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert_consistent(conn, result.batch_id, 5)


def test_a_known_column_name_on_the_wrong_table_keeps_every_check(conn, catalog):
    """item_id -> batch_items is one of the three keys only on workflow_states."""
    conn.execute(
        "ALTER TABLE public.batch_items ADD COLUMN item_id uuid REFERENCES public.batch_items"
    )
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert_consistent(conn, result.batch_id, 5)


def partition_workflow_states(conn, *, foreign_keys: bool) -> None:
    """Replace workflow_states by a table partitioned by status, with a PENDING partition
    (the old table stays as workflow_states_before)."""
    conn.execute("""
        ALTER TABLE public.workflow_states RENAME TO workflow_states_before;
        CREATE TABLE public.workflow_states (LIKE public.workflow_states_before INCLUDING DEFAULTS)
            PARTITION BY LIST (status);
        CREATE TABLE public.workflow_states_pending PARTITION OF public.workflow_states
            FOR VALUES IN ('PENDING');
    """)
    if foreign_keys:
        conn.execute(
            "ALTER TABLE public.workflow_states"
            " ADD FOREIGN KEY (item_id) REFERENCES public.batch_items,"
            " ADD FOREIGN KEY (batch_id) REFERENCES public.batches"
        )


def test_a_partition_attached_during_the_create_stops_it(conn, catalog, db_url, tmp_path):
    """ATTACH PARTITION takes only SHARE UPDATE EXCLUSIVE on the parent, so the create's
    lock does not hold it off (it does when the table has the foreign keys: attaching then
    needs a lock on batch_items the create holds against it). Without them, the check after
    the inserts sees the new partition's trigger, and nothing is written."""
    partition_workflow_states(conn, foreign_keys=False)
    conn.execute(
        "CREATE TABLE public.workflow_states_failed"
        " (LIKE public.workflow_states_before INCLUDING DEFAULTS)"
    )
    add_state_log_trigger(conn, "public.workflow_states_failed")
    before = table_snapshot(conn)
    attached = []

    def attach_once(items: int, bytes_read: int) -> None:
        if not attached:
            # lock_timeout: should the ATTACH ever wait on the create, fail instead of hanging.
            with psycopg.connect(db_url, autocommit=True, options="-c lock_timeout=5s") as other:
                other.execute(
                    "ALTER TABLE public.workflow_states ATTACH PARTITION"
                    " public.workflow_states_failed FOR VALUES IN ('FAILED')"
                )
            attached.append(items)

    path = write_csv(tmp_path / "many.csv", 20_000)
    with pytest.raises(OperationalError, match="changed during the create"):
        create_lib(conn, items=path, on_progress=attach_once)
    assert attached
    assert table_snapshot(conn) == before
    assert conn.execute("SHOW session_replication_role").fetchone()[0] == "origin"


def test_a_latin1_session_still_stores_utf8_text(db_url, conn, catalog, tmp_path):
    """The binary COPY's JSON is UTF-8 whatever the session's client encoding."""
    path = tmp_path / "names.csv"
    path.write_text("name,city\nJosé,Zürich\n", encoding="utf-8")
    jsonl = tmp_path / "names.jsonl"
    jsonl.write_text('{"name": "Søren", "note": "ÆØÅ"}\n', encoding="utf-8")
    with psycopg.connect(db_url, autocommit=True, client_encoding="latin1") as latin:
        assert latin.info.encoding == "iso8859-1"
        first = create_lib(latin, items=path)
        second = create_lib(latin, items=jsonl)
        assert latin.execute("SHOW client_encoding").fetchone()[0] == "LATIN1"  # SET LOCAL
    got = [
        conn.execute("SELECT data FROM public.batch_items WHERE batch_id = %s", (b,)).fetchone()[0]
        for b in (first.batch_id, second.batch_id)
    ]
    assert got == [{"name": "José", "city": "Zürich"}, {"name": "Søren", "note": "ÆØÅ"}]


def test_a_trigger_on_a_partition_keeps_every_check(conn, catalog):
    """Should the dashboard partition workflow_states, its partitions' triggers count too."""
    partition_workflow_states(conn, foreign_keys=True)
    conn.execute(
        "CREATE TABLE public.workflow_states_rest PARTITION OF public.workflow_states DEFAULT"
    )
    result = create_lib(conn)
    assert result.fk_checks == "by_construction"
    assert_consistent(conn, result.batch_id, 5)
    add_state_log_trigger(conn, "public.workflow_states_pending")
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert conn.execute("SELECT count(*) FROM public.state_log").fetchone()[0] == 5


def test_a_user_rule_keeps_every_check(conn, catalog):
    conn.execute("""
        CREATE TABLE public.item_log (id uuid);
        CREATE RULE log_items AS ON INSERT TO public.batch_items
            DO ALSO INSERT INTO public.item_log VALUES (NEW.id);
    """)
    result = create_lib(conn, items=EXAMPLES / "items.jsonl")
    assert result.fk_checks == "server"
    assert_consistent(conn, result.batch_id, 4)


def test_an_unknown_foreign_key_keeps_every_check(conn, catalog):
    """A dashboard column with a foreign key and a default: the create did not make that
    value, so it cannot vouch for it; the server checks (and here refuses) the rows."""
    conn.execute(
        "ALTER TABLE public.batch_items ADD COLUMN owner_id uuid REFERENCES public.clients"
    )
    conn.execute(
        "ALTER TABLE public.batch_items ALTER COLUMN owner_id"
        " SET DEFAULT '00000000-0000-0000-0000-000000000001'"
    )
    before = table_snapshot(conn)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        create_lib(conn)
    assert table_snapshot(conn) == before
    conn.execute("ALTER TABLE public.batch_items ALTER COLUMN owner_id DROP DEFAULT")
    result = create_lib(conn)
    assert result.fk_checks == "server"
    assert_consistent(conn, result.batch_id, 5)


@pytest.fixture
def plain_role(db_url, pg_admin_url):
    """A login role that may write the pipeline's tables and nothing more; yields its URL."""
    role = "wsctl_plain_" + os.urandom(4).hex()
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD 'pw'")
        c.execute(f"GRANT USAGE ON SCHEMA public, wsctl TO {role}")
        c.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public, wsctl TO {role}")
    try:
        yield role, url_for(db_url, dbname, user=role, password="pw")
    finally:
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")  # its grants, the parameter's included
        with psycopg.connect(pg_admin_url, autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            c.execute(f"DROP ROLE {role}")


def test_a_role_that_may_not_set_the_parameter_gets_every_check(conn, catalog, plain_role):
    role, url = plain_role
    with psycopg.connect(url, autocommit=True) as rc:
        result = create_lib(rc)
    assert result.fk_checks == "server"
    assert_consistent(conn, result.batch_id, 5)
    # Granted SET on the parameter (PostgreSQL 15+, as a platform may grant it), it skips them.
    conn.execute(f"GRANT SET ON PARAMETER session_replication_role TO {role}")
    with psycopg.connect(url, autocommit=True) as rc:
        result = create_lib(rc)
        assert rc.execute("SHOW session_replication_role").fetchone()[0] == "origin"
    assert result.fk_checks == "by_construction"
    assert_consistent(conn, result.batch_id, 5)


def test_a_role_allowed_only_a_plain_set_uses_the_fast_path(db_url, conn, catalog, plain_role):
    """Supabase's case as near as PostgreSQL without supautils gets: the role may run a plain
    SET LOCAL session_replication_role, while has_parameter_privilege answers false and
    set_config refuses that parameter (both shadowed for this role, ahead of pg_catalog)."""
    role, url = plain_role
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    conn.execute(f"GRANT SET ON PARAMETER session_replication_role TO {role}")
    conn.execute("""
        CREATE FUNCTION public.has_parameter_privilege(text, text) RETURNS boolean
            LANGUAGE sql AS 'SELECT false';
        CREATE FUNCTION public.set_config(name text, value text, local boolean) RETURNS text
        LANGUAGE plpgsql AS $$
        BEGIN
            IF name = 'session_replication_role' THEN
                RAISE EXCEPTION 'permission denied to set parameter "%"', name
                    USING ERRCODE = '42501';
            END IF;
            RETURN pg_catalog.set_config(name, value, local);
        END $$;
    """)
    conn.execute(f"ALTER ROLE {role} IN DATABASE {dbname} SET search_path = public, pg_catalog")
    with psycopg.connect(url, autocommit=True) as rc:
        probe = "SELECT has_parameter_privilege('session_replication_role', 'SET')"
        assert rc.execute(probe).fetchone()[0] is False
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rc.execute("SELECT set_config('session_replication_role', 'replica', true)")
        result = create_lib(rc)
        assert rc.execute("SHOW session_replication_role").fetchone()[0] == "origin"
    assert result.fk_checks == "by_construction"
    assert_consistent(conn, result.batch_id, 5)


def test_a_bad_row_under_the_skip_still_writes_nothing(conn, catalog, tmp_path):
    path = write_csv(tmp_path / "bad.csv", 3000, bad_at_row=2500)
    before = table_snapshot(conn)
    with pytest.raises(OperationalError, match="line 2501"):
        create_lib(conn, items=path)
    assert table_snapshot(conn) == before
    assert conn.execute("SHOW session_replication_role").fetchone()[0] == "origin"


# --- round trips ------------------------------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    header=st.lists(_TEXT, min_size=1, max_size=4, unique=True),
    cells=st.lists(st.lists(_TEXT, min_size=4, max_size=4), min_size=1, max_size=5),
)
def test_any_csv_text_comes_back_unchanged(conn, catalog, tmp_path, header, cells):
    """Quotes, commas, newlines, tabs and backslashes survive CSV -> COPY -> jsonb."""
    rows = [row[: len(header)] for row in cells]
    path = tmp_path / "round.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    expected = [dict(zip(header, r, strict=True)) for r in rows]
    got = stored_items(conn, create_lib(conn, items=path).batch_id)
    assert got == expected


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(objects=st.lists(st.dictionaries(_TEXT, _JSON, max_size=4), min_size=1, max_size=5))
def test_any_json_object_comes_back_unchanged(conn, catalog, tmp_path, objects):
    path = tmp_path / "round.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    got = stored_items(conn, create_lib(conn, items=path).batch_id)
    assert got == objects


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(keys=st.lists(_TEXT, min_size=1, max_size=8, unique=True))
def test_keys_are_written_in_jsonb_order(conn, keys):
    """The client sends each object's keys already in the order jsonb keeps them
    (so the server's sort finds them sorted): the same order PostgreSQL gives back."""
    obj = json.dumps(dict.fromkeys(keys, ""))
    server = [r[0] for r in conn.execute("SELECT jsonb_object_keys(%s::jsonb)", (obj,))]
    assert [keys[i] for i in itemfiles.jsonb_key_order(keys)] == server


def test_percent_signs_in_csv_keys_and_values_are_plain_text(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('"100%","%s","%(x)s"\n"%d","50%","%%"\n', encoding="utf-8")
    with itemfiles.open_items(path) as stream:
        (text,) = stream.json_rows()
    assert json.loads(text) == {"100%": "%d", "%s": "50%", "%(x)s": "%%"}


def test_csv_rows_go_out_in_jsonb_key_order_and_jsonl_as_written(tmp_path):
    csv_path = tmp_path / "k.csv"
    csv_path.write_text("zz,a,\u00e9,b\n1,2,3,4\n", encoding="utf-8")
    jsonl_path = tmp_path / "k.jsonl"
    jsonl_path.write_text('{"zz": 1, "a": {"y": 1}}\r\n\n{}\n', encoding="utf-8")
    with itemfiles.open_items(csv_path) as stream:
        assert list(stream.json_rows()) == ['{"a":"2","b":"4","zz":"1","\u00e9":"3"}']
    with itemfiles.open_items(jsonl_path) as stream:
        assert list(stream.json_rows()) == ['{"zz": 1, "a": {"y": 1}}', "{}"]


def test_jsonl_numbers_are_stored_exactly(conn, catalog, tmp_path):
    """PostgreSQL parses each object's own text: numeric keeps what the file says."""
    big = "1" * 4400  # longer than Python's default int-from-string limit
    path = tmp_path / "n.jsonl"
    path.write_text(
        '{"price": 1.10, "ratio": 0.1000000000000000055511151231257827, "e": 1e400,'
        f' "tiny": -2.5E-300, "big": {big}, "n": [0, -0, 7]}}\n',
        encoding="utf-8",
    )
    result = create_lib(conn, items=path)
    row = conn.execute(
        "SELECT data->>'price', data->>'ratio', data->'e' = '1e400'::jsonb,"
        " data->>'tiny', data->>'big', data->'n' FROM public.batch_items WHERE batch_id = %s",
        (result.batch_id,),
    ).fetchone()
    assert row == (
        "1.10",
        "0.1000000000000000055511151231257827",
        True,
        "-0." + "0" * 299 + "25",
        big,
        [0, 0, 7],
    )


NUMBERS = [
    "1e400",
    "1e131071",
    "9e131071",
    "99e131070",
    "10e131071",
    "1e131072",
    "0e131073",
    "1e-16383",
    "1.5e-16382",
    "1.55e-16382",
    "0e-16383",
    "0e-16384",
    "0.0e-16383",
    "0.00e-16382",
    "0e1073741822",
    "0e1073741823",
    "1e1073741823",
    "1e-1073741823",
    "0e99999999999999999999",
    "1e00000000000000000000000000000000005",
    "-0.001e+5",
    "0.00000000000000000000000000000000001",
    "1" * 40,
    "-" + "9" * 131072,
    "9" * 131073,
]


# Zeros with an exponent of 1073741823 or more: PostgreSQL 15 refuses them, 18 takes them;
# the check refuses them everywhere.
VERSION_DEPENDENT = {"0e1073741823", "0e99999999999999999999"}


def test_the_number_check_agrees_with_postgresql(conn):
    """Every literal the check lets through PostgreSQL's numeric takes (so the COPY never
    fails on one without a line number), and it refuses only what numeric refuses."""
    for literal in NUMBERS:
        try:
            itemfiles._json_number(literal)
            ours = True
        except ValueError:
            ours = False
        try:
            with conn.transaction():
                conn.execute("SELECT %s::jsonb", ('{"a": ' + literal + "}",))
            theirs = True
        except psycopg.errors.DataError:
            theirs = False
        if ours:
            assert theirs, literal[:40]
        elif literal not in VERSION_DEPENDENT:
            assert not theirs, literal[:40]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"a": 1e131072}', "out of PostgreSQL's numeric range"),
        ('{"a": 1e-16384}', "out of PostgreSQL's numeric range"),
        ('{"a": 0e99999999999999999999}', "out of PostgreSQL's numeric range"),
        ("42", "got a number"),
        ("-1.5e3", "got a number"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ],
    ids=["huge", "tiny", "exponent", "int", "float", "deep"],
)
def test_jsonl_lines_postgresql_cannot_take_are_refused_with_their_line(
    conn, catalog, tmp_path, line, reason
):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n' + line + "\n", encoding="utf-8")
    before = table_snapshot(conn)
    with pytest.raises(OperationalError) as err:
        create_lib(conn, items=path)
    assert "bad.jsonl line 2" in str(err.value) and reason in str(err.value)
    assert table_snapshot(conn) == before


# --- the progress bar ------------------------------------------------------------


def run_with_stderr_on_a_pty(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m wsctl ARGS`` with stderr on a pseudo-terminal (stdout a pipe);
    returns (exit code, stdout, everything written to the terminal)."""
    import pty

    master, slave = pty.openpty()
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    proc = subprocess.Popen(
        wsctl_argv(None, *args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # keep the terminal's buffer from filling while the command runs
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the slave side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out = proc.stdout.read().decode()
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return code, out, b"".join(chunks).decode("utf-8", "replace")


def test_the_progress_bar_is_drawn_on_a_terminal_and_not_otherwise(db_url, conn, catalog, tmp_path):
    items = write_csv(tmp_path / "items.csv", 7)
    env = {**os.environ, "WSCTL_DATABASE_URL": db_url}
    args = list(create_args(items))

    code, out, term = run_with_stderr_on_a_pty(args, env)
    assert code == 0, term
    assert out.startswith("created batch ") and "\x1b" not in out  # stdout is a pipe: plain
    # Rich's bar: a percentage of the file's size, the items counted, and the final
    # phase (writing states, committing) named rather than silent.
    assert "\x1b[" in term, term
    assert "100%" in term and "(7 items)" in term, term
    assert "writing states, committing" in term, term

    plain = subprocess.run(wsctl_argv(None, *args), capture_output=True, env=env, text=True)
    assert plain.returncode == 0, plain.stderr
    # No bar, no escape codes: nothing but the normal lines (acme lacks the clay step's config).
    warning = (
        "wsctl: warning: client acme has no config for step "
        "enrich_company_via_waterfall_in_clay in workstream apollo_scrape"
    )
    assert plain.stderr.splitlines() == [warning]
    assert warning in term
    assert plain.stdout.startswith("created batch ") and len(plain.stdout.splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM public.batch_items").fetchone()[0] == 14
