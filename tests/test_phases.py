"""phases.PhaseClock: each second goes to the phase that was running, nested phases hand the time back."""
import pytest

from minirlhf import phases
from minirlhf.phases import PhaseClock, format_totals


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(phases.time, "perf_counter", lambda: now[0])
    c = PhaseClock("cpu")
    c.advance = lambda seconds: now.__setitem__(0, now[0] + seconds)
    return c


def test_each_second_goes_to_the_running_phase(clock):
    clock.start("generation")
    clock.advance(2)
    clock.start("update")
    clock.advance(3)
    with clock.during("evaluation"):  # inside "update": update is paused, then resumes
        clock.advance(5)
    clock.advance(1)
    assert clock.take() == {"time/generation": 2, "time/update": 4, "time/evaluation": 5}
    clock.advance(100)  # take() stopped the clock: the logging after it is charged to nothing
    clock.start("update")
    clock.advance(7)
    clock.stop()
    clock.advance(100)
    assert clock.take() == {"time/update": 7}
    assert clock.totals() == {"time/generation_seconds": 2, "time/update_seconds": 11, "time/evaluation_seconds": 5}


def test_a_phase_outside_any_iteration_counts_in_the_totals_only(clock):
    with clock.during("evaluation"):  # the evaluation before training
        clock.advance(4)
    assert clock.current is None and clock.totals() == {"time/evaluation_seconds": 4}


def test_format_totals_names_each_phase_total():
    summary = {"time/update_seconds": 4.04, "time/generation_seconds": 2.0, "time/total_seconds": 9.0,
               "time/train_seconds": 8.0}
    assert format_totals(summary) == "update 4.0 s, generation 2.0 s"
