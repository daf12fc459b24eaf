"""The connection module on a real server: pooler safety and per-transaction timeouts."""

from __future__ import annotations

from wsctl import db, settings


def test_transaction_pooler_disables_prepared_statements(db_url, tmp_path):
    (tmp_path / "wsctl.toml").write_text('[database]\npooler = "transaction"\n')
    s = settings.load(db_url)
    assert s.transaction_pooler
    with db.connect(db_url, s) as conn:
        assert conn.prepare_threshold is None
        for _ in range(10):  # would be prepared after 5 runs with the default threshold
            conn.execute("SELECT 1 WHERE %s", (True,))
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as conn:
        assert conn.prepare_threshold == 5  # a direct connection keeps psycopg's default


def test_timeouts_are_transaction_local_and_app_name_is_set(db_url):
    s = settings.Settings(database_url=db_url, url_source="test", statement_timeout="7s")
    with db.connect(db_url, s) as conn:
        assert conn.execute("SHOW application_name").fetchone()[0] == "wsctl"
        default = conn.execute("SHOW statement_timeout").fetchone()[0]
        with db.tx(conn, lock_timeout="3s"):
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "7s"
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "3s"
        # Nothing leaks into the session (a transaction pooler hands it to someone else).
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == default
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"


def test_no_startup_options_are_sent(db_url, tmp_path):
    """PgBouncer rejects unknown startup parameters: wsctl sends none but application_name."""
    s = settings.Settings(database_url=db_url, url_source="test")
    with db.connect(db_url, s) as conn:
        assert (
            "options" not in conn.info.get_parameters() or not conn.info.get_parameters()["options"]
        )
        assert conn.execute("SHOW statement_timeout").fetchone()[0] in ("0", "0ms")
