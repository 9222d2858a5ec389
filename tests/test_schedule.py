"""Schedules: formulas, positions and validation."""

import math

import pytest

from lightning_masks import CallableSchedule, Schedule, ThresholdSchedule, list_schedules, register_schedule
from lightning_masks.lifecycle import get_schedule
from lightning_masks.lifecycle import schedule as schedule_module


def test_cubic_is_zhu_and_gupta():
    schedule = Schedule("cubic", final=0.9, initial=0.1)
    for t in range(0, 11):
        expected = 0.9 + (0.1 - 0.9) * (1 - min(t, 8) / 8) ** 3
        assert math.isclose(schedule.value(t, 0, 8), expected)


@pytest.mark.parametrize("shape", list_schedules())
def test_every_shape_is_monotone_from_initial_to_final(shape):
    schedule = Schedule(shape, final=0.95, initial=0.2)
    values = [schedule.value(t / 10, 1.0, 6.0) for t in range(0, 100)]
    assert values[0] == 0.2 and values[-1] == pytest.approx(0.95)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_shape_specifics():
    assert Schedule("linear", final=0.8).value(5, 0, 10) == pytest.approx(0.4)
    assert Schedule("cosine", final=0.8).value(5, 0, 10) == pytest.approx(0.4)
    assert Schedule("constant", final=0.8).value(3, 3, 10) == 0.8
    assert Schedule("constant", final=0.8).value(2, 3, 10) == 0.0
    one_shot = Schedule("one_shot", final=0.8)
    assert one_shot.value(9, 0, 10) == 0.0 and one_shot.value(10, 0, 10) == 0.8
    # exponential: the density falls geometrically, 1 -> 0.01 halfway gives 0.1
    assert Schedule("exponential", final=0.99).value(5, 0, 10) == pytest.approx(0.9)


def test_span_fractions_units_and_clamping():
    schedule = Schedule("cubic", final=0.9, start=0, end=2 / 3)
    assert schedule.span("epoch", total=12, steps_per_epoch=100) == (0.0, 8.0)
    assert Schedule(final=0.9, start=0.25, end=1.0).span("epoch", 10, 5) == (2.5, 9.0)
    assert Schedule(final=0.9, start=1, end=3).span("step", 1000, 50) == (50.0, 150.0)
    assert Schedule(final=0.9, start=100, end=300, unit="step").span("epoch", 10, 50) == (2.0, 6.0)
    assert Schedule(final=0.9, start=0, end=1.0).span("step", 100, 10, every=30) == (0.0, 90.0)


def test_threshold_schedule_and_callable():
    assert ThresholdSchedule("linear", final=0.5).value(10, 0, 10) == 0.5
    assert CallableSchedule(lambda t: 0.1 * t).value(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"returned 1.5 at t=3"):
        CallableSchedule(lambda t: 0.5 * t).value(3)
    assert isinstance(get_schedule(lambda t: 0.0, 0.9), CallableSchedule)
    assert get_schedule(Schedule("linear"), 0.7).final == 0.7
    assert get_schedule(Schedule("linear", final=0.5), 0.7).final == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "quadratic"}, r"unknown schedule 'quadratic'; known schedules: \['constant'"),
        ({"final": 1.0}, r"final sparsity must be in \[0, 1\), got 1.0"),
        ({"initial": -0.1}, r"initial sparsity must be in \[0, 1\), got -0.1"),
        ({"end": 1.5}, r"end=1.5 is a float, read as a fraction"),
        ({"start": -1}, r"start must be an int >= 0"),
        ({"unit": "batch"}, r"unit must be 'epoch' or 'step'"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_a_registered_shape_drives_a_schedule_and_a_duplicate_or_unknown_name_is_refused(monkeypatch):
    monkeypatch.setattr(schedule_module._SHAPES, "_entries", dict(schedule_module._SHAPES._entries))  # this test only
    register_schedule("square_root")(lambda p, initial, final: initial + (final - initial) * p ** 0.5)
    schedule = Schedule("square_root", final=0.8, start=0, end=4)
    assert [schedule.value(t, 0, 4) for t in (0, 1, 4)] == [0.0, 0.4, 0.8]
    assert "square_root" in list_schedules()
    with pytest.raises(ValueError, match="schedule 'cubic' is registered already; pass override=True"):
        register_schedule("cubic")(lambda p, initial, final: final)
    with pytest.raises(ValueError, match=r"unknown schedule 'cubical'; known schedules: \[.*'cubic'"):
        Schedule("cubical")
