"""Logins: --auth / --auth-file, constant-time checks, and failed logins slowed down."""
from __future__ import annotations

import io

import pytest
from fastapi import HTTPException

import app


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(logins=(("ann", "correct horse"),), **kw):
    clock = Clock()
    return app.LoginGuard(list(logins), clock=clock, stream=io.StringIO(), **kw), clock


def locked(check, user, password) -> int:
    with pytest.raises(HTTPException) as caught:
        check(user, password)
    assert caught.value.status_code == 429
    assert "Too many failed logins" in caught.value.detail
    return int(caught.value.detail.rsplit("again in ", 1)[1].split(" ")[0])


def test_right_login_passes_and_wrong_ones_fail():
    g, _ = guard([("ann", "correct horse"), ("bob", "battery staple")])
    assert g.check("ann", "correct horse") is True
    assert g.check("bob", "battery staple") is True
    assert g.check("ann", "battery staple") is False  # another user's password
    assert g.check("ann", "correct hors") is False
    assert g.check("eve", "correct horse") is False
    assert g.check("", "") is False


def test_failures_lock_the_name_with_growing_waits_even_for_the_right_password():
    g, clock = guard(free=3, base=2.0, cap=30.0)
    for _ in range(3):
        assert g.check("ann", "guess") is False
    assert g.check("ann", "guess") is False  # 4th failure: locked for 2 s
    assert locked(g.check, "ann", "correct horse") == 2  # refused unseen while locked
    clock.now += 2.01
    assert g.check("ann", "guess") is False  # 5th: 4 s
    assert locked(g.check, "ann", "guess") == 4
    clock.now += 4.01
    assert g.check("ann", "guess") is False  # 6th: 8 s
    clock.now += 8.01
    assert g.check("ann", "guess") is False  # 7th: 16 s
    clock.now += 16.01
    assert g.check("ann", "guess") is False  # 8th: capped at 30 s
    assert locked(g.check, "ann", "x") == 30
    clock.now += 30.01
    assert g.check("ann", "correct horse") is True  # success clears the count
    assert g.check("ann", "guess") is False
    assert g.check("ann", "correct horse") is True


def test_a_lock_on_one_name_does_not_lock_another():
    g, _ = guard([("ann", "correct horse"), ("bob", "battery staple")], free=2)
    for _ in range(3):
        assert g.check("ann", "guess") is False
    locked(g.check, "ann", "correct horse")
    assert g.check("bob", "battery staple") is True


def test_guessing_under_many_names_locks_everyone():
    g, clock = guard(free=5, global_free=10, base=1.0)
    for i in range(11):
        assert g.check(f"user{i}", "guess") is False
    locked(g.check, "ann", "correct horse")
    clock.now += 1.01
    assert g.check("ann", "correct horse") is True


def test_counts_are_forgotten_after_a_quiet_hour():
    g, clock = guard(free=2, forget=3600.0)
    for _ in range(2):
        g.check("ann", "guess")
    clock.now += 3601
    for _ in range(2):
        assert g.check("ann", "guess") is False  # two free attempts again, no lock
    assert g.check("ann", "correct horse") is True


def test_unknown_names_do_not_grow_memory_without_bound(monkeypatch):
    monkeypatch.setattr(app.LoginGuard, "MAX_NAMES", 50)
    g, clock = guard(global_free=10**9)
    for i in range(500):
        clock.now += 0.001
        g.check(f"name{i}", "x")
    assert len(g._names) <= 50


def test_gradio_is_given_a_plain_function():
    """gradio awaits the auth callable only if it is a coroutine function; anything else must
    return a bool (a coroutine object would be truthy and let everyone in)."""
    import inspect
    g, _ = guard()
    assert inspect.ismethod(g.check) and not inspect.iscoroutinefunction(g.check)
    assert g.check("ann", "nope") is False


def test_auth_file_lines(tmp_path, capsys):
    logins = tmp_path / "logins.txt"
    logins.write_text("# team\nann:correct horse\n\n  bob:pa:ss:word  \n")
    args = app.parse_args(["--auth-file", str(logins)])
    assert app.credentials(args) == [("ann", "correct horse"), ("bob", "pa:ss:word")]
    both = app.parse_args(["--auth", "cid:abcdefghijklmnop", "--auth-file", str(logins)])
    assert app.credentials(both)[0] == ("cid", "abcdefghijklmnop")
    one = tmp_path / "one.txt"
    one.write_text("ann:correct horse\n")
    assert app.credentials(app.parse_args(["--auth-file", str(one)])) == ("ann", "correct horse")


@pytest.mark.parametrize("text, words", [
    ("ann\n", "line 1"), ("ok:fine\n:nouser\n", "line 2"), ("ann:\n", "line 1"),
    ("# only a comment\n", "holds no USER:PASS"), ("a:b\na:c\n", "listed twice"),
])
def test_bad_auth_files_are_refused_without_echoing_passwords(tmp_path, text, words):
    path = tmp_path / "logins.txt"
    path.write_text(text)
    with pytest.raises(SystemExit) as caught:
        app.credentials(app.parse_args(["--auth-file", str(path)]))
    assert words in str(caught.value)
    assert "fine" not in str(caught.value) and ":c" not in str(caught.value)


def test_missing_auth_file_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot read"):
        app.credentials(app.parse_args(["--auth-file", str(tmp_path / "none.txt")]))


def test_short_password_is_warned_about_when_shared(capsys):
    app.credentials(app.parse_args(["--share", "--auth", "ann:short"]))
    assert "shorter than" in capsys.readouterr().err
    app.credentials(app.parse_args(["--auth", "ann:short"]))  # loopback: no warning
    assert "shorter than" not in capsys.readouterr().err
