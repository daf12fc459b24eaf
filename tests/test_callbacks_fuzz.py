"""The example Clay receiver (``handle_clay_callback``) fuzzed on a real PostgreSQL.

Hypothesis builds bodies of every shape (JSON values with NaN, ``\\u0000``, lone surrogates,
non-string keys, deep nesting; raw bytes; forged, stale and valid tokens) against states in
every status and generation. Whatever comes in: no exception, a status in {200, 400, 401,
404, 409}, nothing written unless 200, 401 exactly for what does not prove itself, and a
200 exactly for a storable payload whose token's generation is the waiting state's current
one. Each example runs in a transaction that is rolled back, so all start from one set of
states.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from tests.conftest import table_snapshot
from tests.support import factories as f
from wsctl.dispatch.local import load_app
from wsctl.queries import example_path
from wsctl.states import ORDER, Status

APP = load_app(str(example_path("enrichment_app.py")))
logic = APP.logic

SECRET = "fuzz-callback-secret"
CLAY_STEP = logic.STEP_CLAY_COMPANY
NEXT_STEP = logic.STEP_CLAY_PERSON
GENERATION = 2  # every fixture state has been claimed twice
STATUSES = [s.value for s in ORDER]
ANSWERS = {200, 400, 401, 404, 409}


@dataclass(frozen=True)
class Target:
    state_id: uuid.UUID
    status: str


@pytest.fixture
def targets(conn) -> list[Target]:
    """One state per status, all of the Clay company step at generation GENERATION."""
    client = f.add_client(conn)
    batch = f.add_batch(conn, client, [CLAY_STEP, NEXT_STEP], len(STATUSES))
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM workflow_states WHERE batch_id = %s ORDER BY id", (batch,)
        ).fetchall()
    ]
    for state_id, status in zip(ids, STATUSES, strict=True):
        conn.execute(
            "UPDATE workflow_states SET status = %s, dispatch_generation = %s WHERE id = %s",
            (status, GENERATION, state_id),
        )
    return [Target(i, s) for i, s in zip(ids, STATUSES, strict=True)]


# --- strategies -----------------------------------------------------------------

_chars = st.one_of(
    st.characters(codec=None, categories=["Cs"]),  # lone surrogates
    st.characters(),
    st.sampled_from(["\x00", "\ud800", "\udfff", "\u00e9", "\u2028", '"', "\\"]),
)
texts = st.text(_chars, max_size=12)
floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0]))
ints = st.one_of(st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**1000]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(texts, children, max_size=4),
        st.dictionaries(st.integers(), children, max_size=2),  # keys JSON cannot have
    ),
    max_leaves=16,
)


@st.composite
def nested(draw, max_depth: int = 300) -> Any:
    """A dict or list nested ``depth`` levels around a scalar (depth up to ``max_depth``)."""
    depth = draw(st.integers(1, max_depth))
    value = draw(scalars)
    for _ in range(depth):
        value = {"k": value} if draw(st.booleans()) else [value]
    return value


# What PostgreSQL stores as it is (no NaN, no \u0000, no lone surrogate, text keys).
clean_texts = st.text(st.characters(exclude_characters="\x00"), max_size=12)
clean_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        clean_texts,
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(clean_texts, children),
    max_leaves=16,
)
dirty_values = st.one_of(
    st.dictionaries(texts, json_values, max_size=5),
    json_values,
    nested(),
    st.builds(lambda v: {"deep": v}, nested()),
)


@st.composite
def enriched_values(draw) -> Any:
    if draw(st.integers(0, 2)):  # two in three storable
        return draw(st.dictionaries(clean_texts, clean_values, max_size=5))
    return draw(dirty_values)


@dataclass
class Case:
    body: Any  # what the receiver gets: a dict, bytes or str
    target: Target | None  # the fixture state the body names, if any
    generation: int | None  # the generation its token is valid for (None: not valid)
    steps: tuple[str, ...] | None
    enriched: Any = None


# (kind, generation) a token is built from.
token_kinds = st.one_of(
    st.tuples(st.just("valid"), st.just(GENERATION)),  # for the states' current generation
    st.tuples(st.just("valid"), st.sampled_from([GENERATION - 1, 0, 99])),  # for another one
    st.tuples(st.sampled_from(["other-state", "other-secret", "mutated", "garbage"]), st.none()),
)


@st.composite
def cases(draw, targets: list[Target]) -> Case:
    waiting = [
        i for i, t in enumerate(targets) if t.status in (Status.DISPATCHING, Status.DISPATCHED)
    ]
    # Half the time a state waiting for a callback; else any, or (== len) one that does not exist.
    index = draw(st.sampled_from(waiting) | st.integers(0, len(targets)))
    target = targets[index] if index < len(targets) else None
    state_id = target.state_id if target else uuid.uuid4()
    kind, gen = draw(token_kinds)
    generation = None
    if kind == "valid":
        token: Any = logic.callback_token(state_id, gen, SECRET)
        generation = gen
    elif kind == "other-state":
        token = logic.callback_token(uuid.uuid4(), GENERATION, SECRET)
    elif kind == "other-secret":
        other = draw(st.text(min_size=1).filter(lambda k: k != SECRET))
        token = logic.callback_token(state_id, GENERATION, other)
    elif kind == "mutated":
        good = logic.callback_token(state_id, GENERATION, SECRET)
        pos = draw(st.integers(0, len(good) - 1))
        ch = draw(_chars.filter(lambda c, p=pos: c != good[p]))
        token = good[:pos] + ch + good[pos + 1 :]
    else:
        token = draw(st.one_of(texts, json_values))
    sid: Any = str(state_id)
    if draw(st.integers(0, 9)) == 0:  # sometimes the state id itself is mangled
        sid = draw(st.one_of(texts, json_values, st.just(sid + "\ud800"), st.just(sid.upper())))
        if sid != str(state_id) and sid != str(state_id).upper():
            generation = None  # the token no longer proves itself for this body
    doc: dict = {"state_id": sid, "callback_token": token}
    enriched = draw(enriched_values())
    if draw(st.integers(0, 19)):  # almost always
        doc["enriched"] = enriched
    else:
        enriched = None
    doc.update(draw(st.dictionaries(texts, json_values, max_size=2)))  # may overwrite the keys
    if generation is not None and (doc["state_id"] != sid or doc["callback_token"] != token):
        generation = None  # the extra keys replaced what proved it
    enriched = doc.get("enriched")
    form = draw(st.sampled_from(["dict", "bytes", "ascii-bytes", "str"]))
    body: Any = doc
    if form != "dict":
        try:
            text = json.dumps(doc, ensure_ascii=form == "ascii-bytes")
        except (TypeError, ValueError, RecursionError):  # int keys are fine; huge ints are not
            form = "dict"
        else:
            if form == "str":
                body = text
            else:
                try:
                    body = text.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate, not escaped: send it as str
                    body = text
            # What the receiver will see is the document JSON gives back (keys as text).
            enriched = json.loads(text).get("enriched")
    steps = draw(st.sampled_from([None, (CLAY_STEP,), (NEXT_STEP,), (NEXT_STEP, CLAY_STEP)]))
    return Case(body, target if generation is not None else None, generation, steps, enriched)


def storable(value: Any, depth: int = 1) -> bool:
    """The test's own account of what jsonb stores as sent (iterative: any depth)."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if d > logic.MAX_ENRICHED_DEPTH:
            return False
        if isinstance(v, str):
            if "\x00" in v or any(0xD800 <= ord(c) <= 0xDFFF for c in v):
                return False
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if abs(v) >= 2**3000:
                return False
        elif isinstance(v, float):
            if not math.isfinite(v):
                return False
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or not storable(k):
                    return False
                stack.append((x, d + 1))
        else:
            return False
    return True


def check(conn, case: Case) -> int:
    """Run one case inside a transaction that is rolled back; assert every property."""
    with conn.transaction(force_rollback=True):
        before = table_snapshot(conn)
        res = logic.handle_clay_callback(
            case.body, secret=SECRET, expected_steps=case.steps, conn=conn
        )
        assert res.status in ANSWERS, res
        assert isinstance(res.body, dict)
        json.dumps(res.body)  # the answer itself is JSON
        if res.status != 200:
            assert table_snapshot(conn) == before
        proven = case.generation is not None
        assert (res.status == 401) == (not proven), (res, case)
        if not proven:
            return res.status
        clean = isinstance(case.enriched, dict) and storable(case.enriched)
        if not clean:
            assert res.status == 400, (res, case)
            return res.status
        if case.target is None:
            assert res.status == 404, (res, case)
            return res.status
        waiting = (
            case.target.status in (Status.DISPATCHING, Status.DISPATCHED)
            and case.generation == GENERATION
            and (case.steps is None or CLAY_STEP in case.steps)
        )
        assert res.status == (200 if waiting else 409), (res, case)
        if res.status == 200:
            # Stored as sent: equal to what PostgreSQL makes of the same JSON.
            status, same = conn.execute(
                "SELECT s.status, i.data -> 'clay' -> %s = %s::jsonb"
                " FROM workflow_states s JOIN batch_items i ON i.id = s.item_id WHERE s.id = %s",
                (CLAY_STEP, Jsonb(case.enriched), case.target.state_id),
            ).fetchone()
            assert (status, same) == (Status.COMPLETED, True)
    return res.status


SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(data=st.data())
def test_the_receiver_answers_every_body_and_writes_only_on_200(conn, targets, data):
    event(f"HTTP {check(conn, data.draw(cases(targets)))}")  # --hypothesis-show-statistics


@SETTINGS
@given(body=st.one_of(json_values, st.binary(max_size=64), texts))
def test_arbitrary_values_and_bytes_are_refused_as_unproven(conn, targets, body):
    with conn.transaction(force_rollback=True):
        before = table_snapshot(conn)
        res = logic.handle_clay_callback(body, secret=SECRET, conn=conn)
        assert res.status == 401
        assert table_snapshot(conn) == before


def _valid(target: Target, **extra) -> dict:
    token = logic.callback_token(target.state_id, GENERATION, SECRET)
    return {"state_id": str(target.state_id), "callback_token": token, **extra}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(depth=st.sampled_from([1_000, 10_000, 100_000]), leaf=st.sampled_from(["1", "NaN", '"x"']))
@example(depth=100_000, leaf="1")
def test_deep_nesting_anywhere_is_a_401_or_400_never_a_recursion_error(conn, targets, depth, leaf):
    """100,000 levels as raw JSON (401: it cannot be read, so it cannot prove itself) and as
    an already decoded ``enriched`` of a proven callback (400)."""
    dispatched = next(t for t in targets if t.status == Status.DISPATCHED)
    raw = b'{"state_id": ' + b"[" * depth + leaf.encode() + b"]" * depth + b"}"
    deep: Any = leaf
    for _ in range(depth):
        deep = {"k": deep}
    with conn.transaction(force_rollback=True):
        before = table_snapshot(conn)
        assert logic.handle_clay_callback(raw, secret=SECRET, conn=conn).status == 401
        res = logic.handle_clay_callback(
            _valid(dispatched, enriched=deep), secret=SECRET, conn=conn
        )
        assert res.status == 400
        assert "nested deeper" in res.body["error"]
        assert table_snapshot(conn) == before


@pytest.mark.parametrize(
    "raw_enriched",
    [b"NaN", b"Infinity", b'"\\u0000"', b'"\\ud800"', b'"\\udfff x"', b'{"\\u0000": 1}'],
)
def test_the_issues_inputs_as_raw_bodies(conn, targets, raw_enriched):
    """The reproductions of issue 11 item 5, as Clay would send them, on a waiting state."""
    dispatched = next(t for t in targets if t.status == Status.DISPATCHED)
    head = json.dumps(_valid(dispatched))[:-1].encode()
    raw = head + b', "enriched": {"v": ' + raw_enriched + b"}}"
    lone = json.dumps(_valid(dispatched, enriched={}))
    with conn.transaction(force_rollback=True):
        before = table_snapshot(conn)
        assert logic.handle_clay_callback(raw, secret=SECRET, conn=conn).status == 400
        bad_token = lone.replace('"callback_token": "v2', '"callback_token": "\\ud800v2')
        assert logic.handle_clay_callback(bad_token, secret=SECRET, conn=conn).status == 401
        assert table_snapshot(conn) == before
