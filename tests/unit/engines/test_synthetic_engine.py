"""The synthetic engine in-process: deterministic text, stops, limits, options."""

from __future__ import annotations

import pytest

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Chunk,
    EngineOptionError,
    Finished,
    Job,
    JobRejected,
    SamplingParams,
)
from exgen.daemon.engines.synthetic import SyntheticEngine


def job(key: int, prompt: str, **params) -> Job:
    return Job(key, prompt, None, SamplingParams.from_wire(params))


def run(engine: SyntheticEngine) -> list:
    events = []
    while engine.pending:
        events.extend(engine.step())
    return events


def test_same_prompt_same_text_and_length():
    engine = SyntheticEngine(None, {})
    engine.load()
    engine.add(job(1, "hello there", max_new_tokens=12))
    engine.add(job(2, "hello there", max_new_tokens=12))
    engine.add(job(3, "something else", max_new_tokens=12))
    done = {e.key: e for e in run(engine)}
    assert done[1].text == done[2].text != done[3].text
    assert done[1].completion_tokens == 12 and len(done[1].text.split()) == 12
    assert done[1].finish_reason == P.FINISH_LENGTH
    assert done[1].prompt_tokens == 2


def test_stop_string_cuts_the_text():
    engine = SyntheticEngine(None, {"token_ms": "0.01"})
    engine.load()
    engine.add(job(1, "hello there", max_new_tokens=40))
    full = run(engine)[0].text
    stop = full.split()[5]
    engine.add(job(2, "hello there", max_new_tokens=40, stop=[stop]))
    cut = run(engine)[0]
    assert cut.finish_reason == P.FINISH_STOP
    assert cut.text == full[: full.find(stop)]


def test_capacity_limits_concurrency_and_streaming_chunks():
    engine = SyntheticEngine(None, {"capacity": "2", "token_ms": "0.01"})
    engine.load()
    for key in range(5):
        engine.add(Job(key, f"p{key}", None, SamplingParams(max_new_tokens=3), stream=True))
    first = engine.step()
    assert {e.key for e in first} == {0, 1}
    assert all(isinstance(e, Chunk) for e in first)
    events = first + run(engine)
    finished = [e for e in events if isinstance(e, Finished)]
    assert sorted(e.key for e in finished) == [0, 1, 2, 3, 4]


def test_too_long_prompt_is_rejected_with_the_numbers():
    engine = SyntheticEngine(None, {"max_seq_len": "10"})
    with pytest.raises(JobRejected) as info:
        engine.add(job(1, "a b c d e f g h", max_new_tokens=5))
    assert info.value.code == P.E_PROMPT_TOO_LONG
    assert "8 tokens + max_new_tokens 5 > context 10" in info.value.message


def test_cancel_drops_the_job():
    engine = SyntheticEngine(None, {"token_ms": "0.01"})
    engine.add(job(1, "x", max_new_tokens=50))
    engine.add(job(2, "y", max_new_tokens=2))
    engine.step()
    engine.cancel(1)
    assert [e.key for e in run(engine) if isinstance(e, Finished)] == [2]


def test_unknown_and_bad_options_are_refused():
    with pytest.raises(EngineOptionError, match="unknown engine option"):
        SyntheticEngine(None, {"tokens_ms": "1"})
    with pytest.raises(EngineOptionError, match="capacity='many'"):
        SyntheticEngine(None, {"capacity": "many"})


class FakeClock:
    """time.monotonic and time.sleep for the engine, advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_paced_steps_catch_up_host_lag_but_never_bank_idle_time(monkeypatch):
    import exgen.daemon.engines.synthetic as synthetic

    clock = FakeClock()
    monkeypatch.setattr(synthetic.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(synthetic.time, "sleep", clock.sleep)
    engine = SyntheticEngine(None, {"token_ms": "10", "paced": "1", "capacity": "1"})
    engine.add(job(1, "x", max_new_tokens=50))
    engine.step()  # the clock starts: a full 10 ms step
    clock.now += 0.004  # the host was 4 ms late between steps...
    engine.step()  # ...so this step sleeps only 6 ms
    clock.now += 0.5  # idle far longer than a step: nothing banked
    engine.step()  # a full step again
    assert clock.slept == [0.01, 0.006, 0.01]


def test_eos_from_prompt_ends_before_the_budget_like_a_model():
    engine = SyntheticEngine(None, {"eos_from_prompt": "1"})
    engine.load()
    engine.add(job(1, "task a len=7", max_new_tokens=64))
    engine.add(job(2, "task b len=500", max_new_tokens=64))  # the budget still caps it
    engine.add(job(3, "task c", max_new_tokens=9))
    done = {e.key: e for e in run(engine)}
    assert (done[1].completion_tokens, done[1].finish_reason) == (7, P.FINISH_STOP)
    assert (done[2].completion_tokens, done[2].finish_reason) == (64, P.FINISH_LENGTH)
    assert (done[3].completion_tokens, done[3].finish_reason) == (9, P.FINISH_LENGTH)


def test_len_in_a_prompt_means_nothing_without_the_option():
    engine = SyntheticEngine(None, {})
    engine.load()
    engine.add(job(1, "task a len=7", max_new_tokens=20))
    assert run(engine)[0].completion_tokens == 20


FEW_SHOT = " ".join(f"example {i} says {i * 7}." for i in range(20))  # 80 words


def prefill_engine(monkeypatch, **options):
    """An engine whose sleeps are recorded, not slept: the timing model without a clock."""
    slept: list[float] = []
    monkeypatch.setattr("exgen.daemon.engines.synthetic.time.sleep", slept.append)
    engine = SyntheticEngine(None, options)
    engine.load()
    return engine, slept


def test_prefill_costs_each_prompt_token_without_a_cache(monkeypatch):
    engine, slept = prefill_engine(monkeypatch, prefill_token_ms="2", capacity="4")
    engine.add(job(1, FEW_SHOT + " first question", max_new_tokens=3))
    engine.add(job(2, FEW_SHOT + " second one here", max_new_tokens=3))
    done = {e.key: e for e in run(engine)}
    assert slept == [pytest.approx((82 + 83) * 2 / 1000)]  # one step: both prefills
    assert done[1].cached_tokens == done[2].cached_tokens == 0
    assert engine.counters()["prefill_tokens"] == 165
    assert engine.counters()["prefix_hits"] == 0


def test_a_cached_prefix_skips_its_prefill_cost(monkeypatch):
    engine, slept = prefill_engine(
        monkeypatch, prefill_token_ms="1", prefix_cache_tokens="1000", token_ms="1"
    )
    engine.add(job(1, FEW_SHOT + " first question", max_new_tokens=2))
    engine.add(job(2, FEW_SHOT + " second one here", max_new_tokens=2))
    done = {e.key: e for e in run(engine)}
    # Job 2 joined the batch after job 1, in the same step: 80 words = 5 blocks of 16.
    assert done[1].cached_tokens == 0 and done[2].cached_tokens == 80
    assert slept[0] == pytest.approx((1 + 82 + 3) / 1000) and slept[1:] == [0.001]
    counters = engine.counters()
    assert counters["prefix_hits"] == 1 and counters["prefill_tokens_saved"] == 80
    assert counters["prefill_tokens"] == 82 + 3
    engine.add(job(3, FEW_SHOT + " a later batch", max_new_tokens=1))
    assert run(engine)[0].cached_tokens == 80


def test_the_prefix_cache_is_bounded_and_least_recently_used(monkeypatch):
    engine, _ = prefill_engine(monkeypatch, prefix_cache_tokens="96", prefix_block="16")
    other = " ".join(f"other {i} words {i}." for i in range(20))  # 80 words, nothing shared
    for key, prompt in enumerate([FEW_SHOT + " a", other + " b", FEW_SHOT + " c"]):
        engine.add(job(key, prompt, max_new_tokens=1))
        result = run(engine)[0]
    # 6 blocks: the other prompt's 5 pushed out the few-shot's last 4 (chain ends first).
    assert result.cached_tokens == 16


def test_without_prefill_options_no_counters_and_no_cached_tokens():
    engine = SyntheticEngine(None, {})
    engine.load()
    engine.add(job(1, FEW_SHOT, max_new_tokens=2))
    engine.add(job(2, FEW_SHOT, max_new_tokens=2))
    assert [e.cached_tokens for e in run(engine)] == [0, 0]
    assert engine.counters() == {}
