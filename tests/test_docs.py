"""The documentation cannot drift from the code (in the manner of sqlite-utils' test_docs.py).

* Every command ``wsctl --help`` lists (and every sub-command of a group) has a row in the
  README's table of commands.
* The JSON keys ``wsctl/cli/REFERENCE.md`` documents for each ``--json`` command are the
  keys that command prints: each command runs once, through the ``cli`` fixture, against a
  real database holding a little of everything (so no documented list comes out empty).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support import factories

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "wsctl" / "cli" / "REFERENCE.md"
EXAMPLES = ROOT / "examples"

CLAY = "enrich_company_via_waterfall_in_clay"
NORMALIZE = "normalize_all_core_values"


# --- what the docs say -------------------------------------------------------------


def _commands_in_help(run_cli) -> list[str]:
    """Every leaf command, as ``wsctl --help`` and each group's ``--help`` list them."""

    def listed(*argv: str) -> tuple[list[str], bool]:
        """The sub-commands ``wsctl ARGV --help`` lists, and whether ARGV takes options
        of its own (a group such as ``secure`` is a command itself too)."""
        out = run_cli(*argv, "--help").out
        _, _, section = out.partition("\nCommands:\n")
        options = out.partition("\nOptions:\n")[2].partition("\nCommands:\n")[0]
        own = [ln for ln in options.splitlines() if ln.startswith("  -") and "--help" not in ln]
        subs = [ln.split()[0] for ln in section.splitlines() if ln.startswith("  ") and ln.split()]
        return subs, bool(own)

    leaves = []
    for name in listed()[0]:
        subs, own = listed(name)
        leaves += ([name] if own or not subs else []) + [f"{name} {sub}" for sub in subs]
    return leaves


def _commands_in_readme_table() -> set[str]:
    """The first cell of each row of the README's command table: `wsctl NAME ...`."""
    text = README.read_text()
    start = text.index("<!-- commands -->")
    end = text.index("<!-- /commands -->")
    found = set()
    for row in text[start:end].splitlines():
        m = re.match(r"\|\s*`wsctl ([a-z][a-z -]*?)(?: [A-Z\[<-].*)?`", row)
        if m:
            found.add(m.group(1).strip())
    return found


def documented_keys() -> dict[str, dict[str, set[str]]]:
    """{command: {path: keys}} from the ``<!-- json: COMMAND -->`` blocks of REFERENCE.md.

    Each block's lines read ``- `PATH`: `key`, `key`, ...``: PATH is ``.`` for the
    document itself, ``[]`` for the elements of a top-level list, ``checks[]`` for the
    elements of the list under ``checks``, ``counts`` for the object under ``counts``.
    A key whose value is not broken down by its own line is not checked further
    (free-form objects such as a client's config).
    """
    text = REFERENCE.read_text()
    blocks = re.findall(r"<!-- json: ([a-z -]+?) -->\n(.*?)<!-- /json -->", text, re.S)
    out: dict[str, dict[str, set[str]]] = {}
    for command, body in blocks:
        paths: dict[str, set[str]] = {}
        for m in re.finditer(r"^- `([^`]+)`: (.+)$", body, re.M):
            paths[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
        out[command] = paths
    return out


# --- what the commands print -------------------------------------------------------


def _at(doc, path: str) -> list[dict]:
    """The objects found at ``path`` (``.``, ``[]``, ``a``, ``a[]``, ``a[].b[]``)."""
    nodes = [doc]
    if path == ".":
        return nodes
    for part in re.findall(r"[^.\[\]]+|\[\]", path):
        nxt = []
        for n in nodes:
            if part == "[]":
                nxt += n if isinstance(n, list) else []
            elif isinstance(n, dict) and isinstance(n.get(part), dict | list):
                nxt.append(n[part])
        nodes = nxt
    return [n for n in nodes if isinstance(n, dict)]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _outputs(cli, run_cli, empty_url: str, conn: psycopg.Connection, tmp: Path) -> dict:
    """Run every --json command once on a database with a little of everything
    (``migrate`` on an empty one, so that it has files to apply)."""
    docs: dict[str, object] = {}
    for name, argv in (("migrate --dry-run", ("--dry-run",)), ("migrate", ())):
        res = run_cli("migrate", *argv, "--json", url=empty_url)
        assert res.code == 0, res.err
        docs[name] = res.json()

    def run(name: str, *argv: str, ok=(0,)) -> object:
        res = cli(*argv, "--json")
        assert res.code in ok, f"wsctl {' '.join(argv)}: exit {res.code}: {res.err}"
        docs[name] = res.json()
        return docs[name]

    run("demo", "demo")  # first: it refuses a database with other clients
    run("settings", "settings")
    run("registry import", "registry", "import", str(EXAMPLES / "registry.toml"))
    run("client add", "client", "add", "acme")
    run("client list", "client", "list")
    run(
        "registry add",
        *("registry", "add", "--step", "score_lead", "--workstream", "apollo_scrape"),
        *("--type", "sync", "--sender", "run_score_lead"),
    )
    run("registry list", "registry", "list")
    run(
        "registry remove",
        *("registry", "remove", "--step", "score_lead", "--workstream", "apollo_scrape"),
    )
    key = ("--client", "acme", "--step", CLAY, "--workstream", "apollo_scrape")
    run("config set", "config", "set", *key, "--set", "clay_table=apollo", "--set", "n=1")
    run("config unset", "config", "unset", *key, "--key", "n")
    run("config list", "config", "list")
    items = _write(tmp / "items.csv", "company_name,company_domain\nAcme,acme.com\nInitech,\n")
    batch = run(
        "batch create",
        *("batch", "create", "--client", "acme", "--workstream", "apollo_scrape"),
        *("--blueprint", f"{NORMALIZE},{CLAY}", "--items", items, "--dedupe-key", "k1"),
    )
    batch_id = batch["batch_id"]
    item_id = conn.execute(
        "SELECT id::text FROM batch_items WHERE batch_id = %s ORDER BY id LIMIT 1", (batch_id,)
    ).fetchone()[0]
    run("dispatch --dry-run", "dispatch", "--dry-run")
    # The example app: the normalizer runs; the Clay sender raises (no webhook URL in
    # the config), so the pass has errors to report.
    app = str(EXAMPLES / "enrichment_app.py")
    run("dispatch", "dispatch", "--once", "--backend", "local", "--app", app, ok=(0, 1))
    conn.execute("UPDATE workflow_states SET status = 'FAILED' WHERE step_name = %s", (CLAY,))
    run("retry", "retry", "--batch", batch_id)
    run("batch status", "batch", "status", batch_id)
    run("item show", "item", "show", item_id)
    run("config show", "config", "show", "--step", CLAY, "--item", item_id)
    # A legacy batch (no workstream) that nothing registers: backfill leaves it unresolved.
    client_id = conn.execute("SELECT id FROM clients WHERE name = 'acme'").fetchone()[0]
    factories.add_batch(conn, client_id, ["unregistered_step"], 1, workstream=None)
    run("batch list", "batch", "list")
    run("backfill workstream-slug", "backfill", "workstream-slug", "--dry-run", ok=(1,))
    run("doctor", "doctor", ok=(0, 1))
    run("batch cancel", "batch", "cancel", batch_id)
    run("migrate --status", "migrate", "--status")
    run("stats", "stats")
    run("db tune", "db", "tune")
    # The demo's batches are finished: prune them (a dry run first).
    run("prune --dry-run", "prune", "--older-than", "0s", "--dry-run")
    run("prune", "prune", "--older-than", "0s")
    run("limit set", "limit", "set", "clay:acme-ws", "--rate", "10/s", "--burst", "20")
    run("limit list", "limit", "list")
    run("limit show", "limit", "show", "clay:acme-ws")
    run("limit remove", "limit", "remove", "clay:acme-ws")
    run("secure", "secure")
    role = f"docs_worker_{uuid.uuid4().hex[:12]}"  # cluster-wide: unique, dropped below
    conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        run("secure grant-worker", "secure", "grant-worker", role)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    run("examples", "examples")
    run("examples --copy", "examples", "--copy", str(tmp / "examples-copy"))
    # No server under this test's own data dir: status and stop start nothing.
    run("embedded status", "embedded", "status")
    run("embedded stop", "embedded", "stop")
    return docs


# --- the tests ---------------------------------------------------------------------


def test_every_command_in_help_is_in_the_readme_table(run_cli):
    in_help = _commands_in_help(run_cli)
    assert len(in_help) > 15
    table = _commands_in_readme_table()
    assert sorted(set(in_help) - table) == [], "commands missing from the README's table"
    assert sorted(table - set(in_help)) == [], "README table rows for commands that don't exist"


def test_every_command_with_json_has_its_keys_documented(run_cli):
    documented = {c.split(" --")[0] for c in documented_keys()}
    with_json = [c for c in _commands_in_help(run_cli) if "--json" in run_cli(*c.split(), "-h").out]
    assert sorted(set(with_json) - documented) == []


def test_the_documented_json_keys_are_the_printed_ones(cli, run_cli, fresh_db, conn, tmp_path):
    printed = _outputs(cli, run_cli, fresh_db[0], conn, tmp_path)
    documented = documented_keys()
    assert sorted(printed) == sorted(documented), "every documented command is run here"
    wrong = []
    for command, paths in documented.items():
        for path, keys in paths.items():
            objs = _at(printed[command], path)
            if not objs:
                wrong.append(f"{command}: nothing at {path}")
                continue
            seen = set().union(*(o.keys() for o in objs))
            if seen != keys:
                wrong.append(
                    f"{command} {path}: printed but undocumented {sorted(seen - keys)}, "
                    f"documented but not printed {sorted(keys - seen)}"
                )
    assert wrong == []


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    run_tests = re.search(r"^run_tests\(\) \{ (.+); \}$", ci, re.M).group(1)
    readme = README.read_text()
    assert f"pip install -e '.[dev]' && {run_tests}\n" in readme


def test_every_migration_file_is_in_the_reference():
    shipped = sorted(p.name for p in (ROOT / "sql" / "migrations").glob("*.sql"))
    listed = sorted(re.findall(r"^\| `(\d{4}_[a-z0-9_]+\.sql)` \|", REFERENCE.read_text(), re.M))
    assert listed == shipped


DOCS = [
    README,
    REFERENCE,
    ROOT / "wsctl" / "DESIGN.md",
    ROOT / "wsctl" / "dispatch" / "DESIGN.md",
    ROOT / "tests" / "benchmarks" / "README.md",
]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_docs_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert broken == []


@pytest.mark.parametrize("path", [README, REFERENCE])
def test_docs_do_not_speak_of_the_seed(path):
    assert not re.search(r"\bseed'?s?\b", path.read_text(), re.I)


def test_the_reference_shows_the_state_tables_as_the_code_renders_them():
    """The transition and reason tables are generated (wsctl.states): never edited by hand,
    never stale."""
    from wsctl import states

    text = REFERENCE.read_text()
    assert states.transition_table() in text
    assert states.reason_table() in text
