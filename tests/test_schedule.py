import pytest

from trainers.schedule import ScheduleError, parse_schedule


def test_single_rate_runs_to_max_steps():
    schedule = parse_schedule("0.005", 100)
    assert schedule.rate(0) == 0.005 and schedule.rate(99) == 0.005
    assert schedule.rate(100) is None


def test_pieces_hold_until_their_step():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", 2000)
    assert [schedule.rate(s) for s in (0, 99, 100, 999, 1000, 1999)] == \
        [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.rate(2000) is None


def test_exhausted_schedule_ends_before_max_steps():
    schedule = parse_schedule("0.01:10, 0.001:20", 1000)
    assert schedule.rate(19) == 0.001
    assert schedule.rate(20) is None
    assert schedule.end == 20


def test_minus_one_means_max_steps_and_steps_are_capped():
    assert parse_schedule("0.1:-1", 50).end == 50
    assert parse_schedule("0.1:500", 50).end == 50


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("abc", "'abc' is not a number"),
    ("0.1:abc", "not a whole number"),
    ("0.1:", "missing step"),
    ("0.1:100, 0.2:50", "steps must increase"),
    ("0.1, 0.2:50", "only the last entry"),
    ("-0.1", "positive"),
    ("nan", "positive"),
    ("0.1:0", "positive or -1"),
    ("0.1:10,,0.2", "empty entry"),
])
def test_bad_schedules_are_explained(text, words):
    with pytest.raises(ScheduleError, match=words) as info:
        parse_schedule(text, 1000)
    assert str(info.value).startswith("learn_rate:")


def test_zero_allowed_only_where_asked():
    assert parse_schedule("0", 10, "clip_grad_value", allow_zero=True).rate(0) == 0.0
    with pytest.raises(ScheduleError):
        parse_schedule("0", 10)
