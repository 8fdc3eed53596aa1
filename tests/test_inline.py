"""Where renders run (inline.py), on a synthetic clock: the loop takes only short renders it has
measured, for at most one render's time a turn (the rest of a turn's renders wait for the next
turns) and its share of each second; everything else goes to the codec threads."""

from __future__ import annotations

from spotrelay.inline import KEEP, InlineBudget, Place
from tests.inproc import FakeClock


def budget(**kw) -> tuple[InlineBudget, FakeClock]:
    clock = FakeClock()
    return InlineBudget(share=0.25, longest=0.003, window=1.0, clock=clock, **kw), clock


def test_a_render_never_measured_goes_to_a_thread_and_is_measured_there():
    b, _ = budget()
    assert b.place("fisheye") is Place.THREAD
    b.spent("fisheye", 0.001, on_loop=False)
    assert b.place("fisheye") is Place.LOOP


def test_a_render_longer_than_the_loop_may_be_held_stays_in_threads():
    b, _ = budget()
    b.spent("ptz 1280x720", 0.008, on_loop=False)
    b.spent("depth", 0.0005, on_loop=False)
    assert b.place("ptz 1280x720") is Place.THREAD
    assert b.place("depth") is Place.LOOP


def test_the_loop_renders_at_most_its_share_of_each_second():
    b, clock = budget()
    cost = 2**-9  # about 2 ms, exact in binary
    b.spent("fisheye", cost, on_loop=False)
    taken = 0
    while b.place("fisheye") is Place.LOOP:
        b.spent("fisheye", cost, on_loop=True)
        b.turn_over()  # one render a turn of the loop
        taken += 1
    assert taken == 128  # 0.25 s of each second
    clock.now += 0.5
    assert b.place("fisheye") is Place.THREAD  # the same second: the rest spreads over cores
    clock.now += 0.5
    assert b.place("fisheye") is Place.LOOP  # a new one


def test_one_turn_of_the_loop_renders_for_at_most_the_longest_render():
    """A GetImage reply with several cameras publishes them all in one turn of the loop."""
    b, _ = budget()
    for camera in ("left", "right", "back"):
        b.spent(camera, 0.0013, on_loop=False)
    assert b.place("left") is Place.LOOP
    b.spent("left", 0.0013, on_loop=True)
    assert b.place("right") is Place.LOOP
    b.spent("right", 0.0013, on_loop=True)
    assert b.place("back") is Place.LATER  # 3.9 ms in one turn: this one waits a turn
    b.turn_over()
    assert b.place("back") is Place.LOOP


def test_a_render_that_became_slower_moves_to_threads_at_once_and_back_by_degrees():
    b, _ = budget()
    b.spent("hand", 0.001, on_loop=False)
    assert b.place("hand") is Place.LOOP
    b.spent("hand", 0.008, on_loop=True)  # the hand camera now sends 1280x720
    b.turn_over()
    assert b.place("hand") is Place.THREAD  # the very next one is not held on the loop
    b.spent("hand", 0.001, on_loop=False)  # back to 640x480, measured in the threads
    assert b.place("hand") is Place.THREAD  # one cheap render does not undo a dear one
    for _ in range(12):
        b.spent("hand", 0.001, on_loop=False)
    assert b.place("hand") is Place.LOOP


def test_it_remembers_a_bounded_number_of_kinds_forgetting_the_least_recent():
    b, _ = budget()
    for i in range(KEEP + 10):
        b.spent(("camera", i), 0.001, on_loop=False)
        b.spent(("camera", 0), 0.001, on_loop=False)  # in use all along
    assert len(b._cost) == KEEP
    assert b.place(("camera", 0)) is Place.LOOP
    assert b.place(("camera", 1)) is Place.THREAD  # forgotten: measured again in a thread
    assert b.place(("camera", KEEP + 9)) is Place.LOOP
