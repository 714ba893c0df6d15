"""The failed-check limiter's token bucket, on a clock the test moves."""

from __future__ import annotations

from aus.server.ratelimit import FailureLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_one_per_refill_period():
    clock = Clock()
    lim = FailureLimiter(burst=10, refill_seconds=2, clock=clock)
    assert [lim.take("a") for _ in range(10)] == [0.0] * 10
    assert lim.take("a") == 2.0 and lim.retry_after("a") == 2
    clock.t += 1.0
    assert lim.take("a") == 1.0 and lim.retry_after("a") == 1
    clock.t += 1.0
    assert lim.take("a") == 0.0 and lim.take("a") > 0
    clock.t += 100
    assert [lim.take("a") for _ in range(10)] == [0.0] * 10 and lim.take("a") > 0   # never above burst


def test_addresses_are_separate_and_successes_give_their_token_back():
    clock = Clock()
    lim = FailureLimiter(burst=3, refill_seconds=2, clock=clock)
    for _ in range(3):
        assert lim.take("a") == 0.0
    assert lim.take("a") > 0 and lim.take("b") == 0.0
    for _ in range(20):          # checks that succeed cost nothing
        assert lim.take("b") == 0.0
        lim.give_back("b")
    lim.give_back("a")
    assert lim.take("a") == 0.0 and lim.take("a") > 0


def test_refused_takes_do_not_push_the_wait_further():
    clock = Clock()
    lim = FailureLimiter(burst=1, refill_seconds=2, clock=clock)
    assert lim.take("a") == 0.0
    for _ in range(50):
        assert lim.take("a") == 2.0
    clock.t += 2.0
    assert lim.take("a") == 0.0
