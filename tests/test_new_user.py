"""What a new user hit on a first day (issue 10, part B), each fed the input they gave."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv", [(), ("batch",), ("backfill",)])
def test_a_group_without_a_command_prints_its_help_like_help_does(run_cli, argv):
    bare = run_cli(*argv)
    helped = run_cli(*argv, "--help")
    assert bare.code == 0 and bare.err == ""
    assert bare.out == helped.out
    assert bare.out.startswith("Usage: wsctl")
    assert len(bare.out.splitlines()) > 5  # the help as printed, not squashed into one line
