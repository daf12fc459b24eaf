"""The command layer: parse options, call one library function, render.

``main()`` is the single place where errors become a one-line message on
stderr and an exit code (0 ok, 1 operational, 2 usage, 3 environment), and
the one edge where everything written is redacted (``output.redacting``).
"""

from __future__ import annotations

import os
import sys
import traceback


def _debug_requested(argv: list[str]) -> bool:
    return os.environ.get("WSCTL_DEBUG", "") not in ("", "0") or "--debug" in argv


def _psycopg_exit(exc: BaseException) -> tuple[int, str] | None:
    """Map a psycopg error that escaped the library to an exit code and message."""
    mod = type(exc).__module__ or ""
    if not mod.startswith("psycopg"):
        return None
    import psycopg

    from wsctl.redact import first_line

    if isinstance(exc, psycopg.errors.QueryCanceled):
        return 1, (
            f"{first_line(exc)} (hint: raise [database] statement_timeout in wsctl.toml "
            "for work this large)"
        )
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return 1, (
            f"{first_line(exc)} (hint: try again when the other transaction ends, or raise "
            "[database] lock_timeout)"
        )
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return 3, f"database connection failed: {first_line(exc)}"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return 3, f"insufficient privilege: {first_line(exc)}"
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return 3, f"schema not migrated? {first_line(exc)} (hint: run `wsctl migrate`)"
    return 1, f"database error: {first_line(exc)}"


def _not_utf8(argv: list[str]) -> str | None:
    """The usage error for the first argument that is not valid UTF-8, if any.

    Python hands such bytes over as lone surrogates (``'Caf\\udce9'``); they
    cannot be printed, stored or sent to PostgreSQL, so they stop here.
    """
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogateescape")
            shown = repr(raw)[1:]  # b'Caf\xe9' -> 'Caf\xe9'
            prev = argv[i - 1] if i else ""
            what = (
                f"the value of {prev.partition('=')[0]}"
                if prev.startswith("-") and "=" not in prev
                else f"argument {i + 1}"
            )
            if arg.startswith("-") and "=" in arg:
                what = f"the value of {arg.partition('=')[0]}"
            return f"{what} is not valid UTF-8: {shown} (use UTF-8 names and file names)"
    return None


def _click_exceptions():
    """Typer 0.2x vendors click as typer._click; older Typer uses click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import exceptions
    return exceptions


def _hoist_database_url(argv: list[str]) -> list[str]:
    """``--database-url`` is accepted after the command too (``wsctl migrate --database-url
    URL``), as it always was for ``init`` and ``demo``: it is moved before the command."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == "--database-url" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith("--database-url="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Run wsctl with ``argv`` and return the exit code (never raises for expected failures)."""
    from wsctl.cli.output import redacting

    argv = list(sys.argv[1:] if argv is None else argv)
    # --reveal shows secrets on stdout only; errors and notices stay redacted.
    with redacting(reveal="--reveal" in argv):
        return _main(argv)


def _main(argv: list[str]) -> int:
    import typer

    from wsctl.cli.app import command
    from wsctl.errors import WsctlError

    ce = _click_exceptions()
    debug = _debug_requested(argv)
    bad = _not_utf8(argv)
    if bad:
        print(f"wsctl: error: {bad}", file=sys.stderr)
        return 2
    try:
        rv = command()(args=_hoist_database_url(argv), prog_name="wsctl", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # Typer turns Ctrl-C into Exit(130) before it reaches us
            print("wsctl: interrupted", file=sys.stderr)
        return code
    except WsctlError as exc:
        if debug:
            traceback.print_exc()
        print(f"wsctl: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except (typer.Exit, getattr(ce, "Exit", typer.Exit)) as exc:
        return exc.exit_code
    except ce.UsageError as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            # `wsctl`, `wsctl batch` ...: the help, as `--help` prints it (exit 0).
            print(ctx.get_help())
            return 0
        where = ctx.command_path if ctx is not None else "wsctl"
        msg = " ".join(exc.format_message().split())
        print(f"wsctl: error: {msg} (see `{where} --help`)", file=sys.stderr)
        return 2
    except ce.ClickException as exc:
        print(f"wsctl: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, getattr(ce, "Abort", typer.Abort), KeyboardInterrupt):
        print("wsctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:
        from wsctl.redact import first_line

        mapped = _psycopg_exit(exc)
        if debug or mapped is None:
            traceback.print_exc()
        if mapped is None:
            print(f"wsctl: internal error: {first_line(exc, typed=True)}", file=sys.stderr)
            return 1
        code, msg = mapped
        print(f"wsctl: error: {' '.join(msg.split())}", file=sys.stderr)
        return code


def entry() -> None:
    sys.exit(main())
