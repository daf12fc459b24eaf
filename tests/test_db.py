"""The connection module on a real server: pooler safety and per-transaction timeouts."""

from __future__ import annotations

import psycopg
import pytest

from wsctl import db, settings


def test_no_server_side_prepared_statements_by_default(db_url, tmp_path):
    """Any pooler, any port: nothing is prepared unless asked for on a direct connection."""
    with db.connect(db_url, settings.Settings(database_url=db_url, url_source="test")) as conn:
        assert conn.prepare_threshold is None
        for _ in range(10):  # would be prepared after 5 runs with psycopg's default threshold
            conn.execute("SELECT 1 WHERE %s", (True,))
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0
    (tmp_path / "wsctl.toml").write_text("[database]\nprepared_statements = true\n")
    with db.connect(db_url, settings.load(db_url)) as conn:
        assert conn.prepare_threshold == 5  # asked for, on a direct connection: psycopg's default
    (tmp_path / "wsctl.toml").write_text(
        '[database]\npooler = "transaction"\nprepared_statements = true\n'
    )
    s = settings.load(db_url)
    assert s.transaction_pooler
    with db.connect(db_url, s) as conn:  # a declared transaction pooler wins over the setting
        assert conn.prepare_threshold is None


def test_connection_settings_are_one_object_kept_beside_the_connection(db_url, tmp_path):
    (tmp_path / "wsctl.toml").write_text(
        '[database]\nstatement_timeout = "9s"\nlock_timeout = "250ms"\nconnect_timeout = 4\n'
    )
    s = settings.load(db_url)
    cs = db.ConnectionSettings.from_settings(s)
    assert cs == db.ConnectionSettings(
        statement_timeout="9s", lock_timeout="250ms", connect_timeout=4
    )
    with db.connect(db_url, s) as conn:
        assert db.settings_of(conn) == cs
        assert not hasattr(conn, "info_statement_timeout")
        with db.tx(conn):
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "9s"
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "250ms"
    with db.connect(db_url, cs) as conn:  # the object itself opens a connection too
        assert db.settings_of(conn) is cs
    with psycopg.connect(db_url, autocommit=True) as plain:  # not opened by wsctl: the defaults
        assert db.settings_of(plain) == db.ConnectionSettings()
        with db.tx(plain):
            assert plain.execute("SHOW lock_timeout").fetchone()[0] == "5s"


def test_a_lock_timeout_names_the_locked_table(db_url):
    s = settings.Settings(database_url=db_url, url_source="test", lock_timeout="200ms")
    with psycopg.connect(db_url) as holder, db.connect(db_url, s) as conn:
        holder.execute("LOCK TABLE public.batches IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.LockNotAvailable) as info:
            with db.tx(conn):
                conn.execute("SELECT count(*) FROM batches")
        assert str(info.value) == (
            "lock timeout: waited 200ms for a lock on public.batches held by another session"
        )
        holder.rollback()


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


def test_rows_are_read_by_column_name(db_url):
    """queries.named / rows_as / column: the row readers the library uses instead of r[0]."""
    from dataclasses import dataclass

    from wsctl.queries import column, named, one, rows_as

    @dataclass
    class Pair:
        b: int
        a: str

    s = settings.Settings(database_url=db_url, url_source="test")
    with db.connect(db_url, s) as conn:
        row = one(named(conn).execute("SELECT 1 AS a, 'x' AS b"))
        assert row == {"a": 1, "b": "x"}
        # by name whatever the order of the columns
        assert rows_as(conn, Pair).execute("SELECT 'y' AS a, 2 AS b").fetchall() == [Pair(2, "y")]
        assert column(named(conn).execute("SELECT g AS n FROM generate_series(1, 3) g"), "n") == [
            1,
            2,
            3,
        ]
        with pytest.raises(TypeError):  # a column the class has no field for is an error
            rows_as(conn, Pair).execute("SELECT 1 AS a, 2 AS b, 3 AS c").fetchall()
        with pytest.raises(KeyError):
            column(named(conn).execute("SELECT 1 AS a"), "b")
