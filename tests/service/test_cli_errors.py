"""service.cli.errors.exits_on: a named user error becomes one line on stderr and an exit status."""

from __future__ import annotations

import json

import pytest

from service.cli.errors import exits_on


def test_named_error_exits_with_its_status_and_one_line(capsys):
    @exits_on("json:JSONDecodeError", status=3, message=lambda e: f"bad json at {e.pos}")
    def parse(text):
        return json.loads(text)

    assert parse("[1]") == [1]
    with pytest.raises(SystemExit) as ex:
        parse("[1,")
    assert ex.value.code == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: bad json at 3"]


def test_other_errors_pass_through():
    @exits_on("json:JSONDecodeError")
    def boom():
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        boom()


def test_bad_parameter_inside_a_command_is_one_usage_error_not_a_traceback(tmp_path, capsys):
    from service.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["serve", "--bundle", str(tmp_path)])  # not a bundle: typer.BadParameter
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "Invalid value" in err and "not a bundle directory" in err
    assert "Traceback" not in err
