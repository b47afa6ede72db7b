"""Placement by prefix and by cost, as pure functions; the router's memory of holders."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exgen.daemon.router import placement
from exgen.daemon.router.placement import Affinity, SlotState, Waiting, plan_placement, prompt_facts

HEAD = "You are a careful assistant. " * 10  # 290 bytes


def items(start: int, n: int, tokens: int = 100, shared: int = 80, budget: int = 16):
    return [Waiting(k, tokens, shared, budget) for k in range(start, start + n)]


def slots(n: int, capacity: int = 4, room: int = 6, outstanding: int = 0, cost: int = 0):
    return [SlotState(i, outstanding, capacity, room, cost) for i in range(n)]


# --- the proxy ------------------------------------------------------------------------


def test_prompts_sharing_their_first_bytes_share_a_key():
    a = prompt_facts(HEAD * 2 + "question one", None, 512)
    b = prompt_facts(HEAD * 2 + "another question", None, 512)
    assert a.key is not None and a.key == b.key
    assert a.shared == 512 // placement.BYTES_PER_TOKEN
    assert a.tokens == len((HEAD * 2 + "question one").encode()) // 4


def test_a_prompt_shorter_than_the_key_has_no_key():
    assert prompt_facts("what is 2 + 2?", None, 512).key is None
    assert prompt_facts(HEAD * 3, None, 0).key is None  # 0: keys off


def test_a_conversation_head_keys_whatever_the_last_message_says():
    system = {"role": "system", "content": HEAD}
    a = prompt_facts(None, [system, {"role": "user", "content": "one"}], 512)
    b = prompt_facts(None, [system, {"role": "user", "content": "a longer question"}], 512)
    changed = {"role": "system", "content": "!" + HEAD}
    other = prompt_facts(None, [changed, {"role": "user", "content": "one"}], 512)
    assert a.key is not None and a.key == b.key
    assert other.key != a.key


def test_a_short_head_does_not_key_by_itself():
    system = {"role": "system", "content": "Be brief."}
    a = prompt_facts(None, [system, {"role": "user", "content": "hi"}], 512)
    assert a.key is None  # the whole conversation is shorter than the key


def test_token_ids_key_by_their_first_ids():
    assert prompt_facts(list(range(10)), None, 512).key is None
    ids = list(range(200))
    assert prompt_facts([*ids, 1], None, 512).key == prompt_facts([*ids, 2, 3], None, 512).key
    assert prompt_facts(ids, None, 512).tokens == 200


# --- the plan ----------------------------------------------------------------------------


def test_a_prefix_goes_to_the_worker_that_holds_it():
    groups = [(7, items(0, 3))]
    plan = plan_placement(slots(2), groups, {7: {1}}, slack=1.0)
    assert [k for k, _ in plan[1]] == [0, 1, 2] and 0 not in plan


def test_distinct_prefixes_spread_over_the_workers():
    groups = [(p, items(10 * p, 4)) for p in range(4)]
    plan = plan_placement(slots(4), groups, {}, slack=1.0)
    homes = {slot: {k // 10 for k, _ in placed} for slot, placed in plan.items()}
    assert sorted(len(h) for h in homes.values()) == [1, 1, 1, 1]


def test_cost_counts_cached_tokens_only_on_a_holder():
    plan = plan_placement(slots(1), [(7, items(0, 1))], {7: {0}}, slack=1.0)
    assert plan[0] == [(0, 100 - 80 + 16)]
    plan = plan_placement(slots(1), [(None, items(0, 1))], {}, slack=1.0)
    assert plan[0] == [(0, 100 + 16)]


def test_long_prompts_are_spread_by_cost_not_count():
    long = [Waiting(k, 1000, 0, 16) for k in range(2)]
    short = [Waiting(k, 10, 0, 16) for k in range(2, 8)]
    plan = plan_placement(slots(2), [(None, long + short)], {}, slack=1.0)
    assert {k for k, _ in plan[0]} & {0, 1} and {k for k, _ in plan[1]} & {0, 1}


def test_a_worker_below_capacity_takes_a_prefix_far_behind():
    # Slot 0 holds prefix 7 and is full; 20 of it wait, past 1 x its capacity of 4.
    states = [SlotState(0, 6, 4, 0, 600), SlotState(1, 0, 4, 6, 0)]
    plan = plan_placement(states, [(7, items(0, 20))], {7: {0}}, slack=1.0)
    assert len(plan[1]) == 6


def test_within_the_slack_a_prefix_waits_for_its_holder():
    states = [SlotState(0, 4, 4, 2, 400), SlotState(1, 0, 4, 6, 0)]  # slot 0 full
    plan = plan_placement(states, [(7, items(0, 2))], {7: {0}}, slack=1.0)
    assert len(plan[0]) == 2 and 1 not in plan  # into its prefetch: 2 staged, within 4
    assert plan_placement(states, [(7, items(0, 6))], {7: {0}}, slack=0.5)[1]


def test_a_holders_prefetch_counts_as_its_prefixs_backlog():
    # Slot 0 runs 4 and holds 2 more: with 4 staged, 6 wait for it, past one batch.
    states = [SlotState(0, 6, 4, 0, 600), SlotState(1, 0, 4, 6, 0)]
    plan = plan_placement(states, [(7, items(0, 4))], {7: {0}}, slack=1.0)
    assert len(plan[1]) == 4


def test_a_small_job_of_one_new_prefix_uses_both_workers():
    # 18 items at capacity 8: one worker takes 8 and 2 of prefetch; the 8 left would
    # wait for it (a third batch on it) while the other idled.
    plan = plan_placement(slots(2, capacity=8, room=10), [(7, items(0, 18))], {}, slack=1.0)
    assert sorted(len(placed) for placed in plan.values()) == [8, 10]


# The last batch: slot 0 just ended a batch (2 prefetched items left, room 16); slot 1,
# the other holder, is full (16 running, 2 prefetched).
LAST = [SlotState(0, 2, 16, 16, 200), SlotState(1, 18, 16, 0, 1800)]


def test_a_last_batch_fills_holders_to_capacity_not_their_prefetch():
    plan = plan_placement(LAST, [(7, items(0, 20))], {7: {0, 1}}, 1.0, last_batch=True)
    assert len(plan[0]) == 14  # 2 + 14 = its capacity; 6 wait for the first slot to free


def test_a_last_batch_is_a_prefix_with_nothing_left_unstaged():
    plan = plan_placement(LAST, [(7, items(0, 20))], {7: {0, 1}}, 1.0, last_batch=False)
    assert len(plan[0]) == 16  # more may wait unstaged: prefetch as ever


def test_a_prefix_past_one_batch_of_its_holders_takes_prefetch():
    plan = plan_placement(LAST, [(7, items(0, 33))], {7: {0, 1}}, 1.0, last_batch=True)
    assert len(plan[0]) == 16  # 33 > 16 + 16


def test_a_prefix_with_one_holder_takes_prefetch_to_the_end():
    plan = plan_placement(LAST, [(7, items(0, 10))], {7: {0}}, 1.0, last_batch=True)
    assert len(plan[0]) == 10  # no other holder could start them sooner


def test_a_dead_holder_does_not_count():
    plan = plan_placement(slots(1), [(7, items(0, 2))], {7: {5}}, slack=1.0)
    assert len(plan[0]) == 2


@given(
    st.lists(
        st.tuples(st.integers(0, 8), st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=6
    ),
    st.dictionaries(st.none() | st.integers(0, 5), st.integers(1, 30), max_size=5),
    st.dictionaries(st.integers(0, 5), st.sets(st.integers(0, 7), max_size=3), max_size=5),
    st.floats(0, 3),
    st.booleans(),
)
def test_plan_invariants(triples, sizes, holders, slack, last_batch):
    states = [SlotState(i, o, c, r, o * 10) for i, (o, c, r) in enumerate(triples)]
    groups, start = [], 0
    for prefix, n in sizes.items():
        groups.append((prefix, items(start, n)))
        start += n
    plan = plan_placement(states, groups, holders, slack, last_batch)
    placed = [k for placed in plan.values() for k, _ in placed]
    assert len(placed) == len(set(placed))  # each item once
    for state in states:
        assert len(plan.get(state.slot, [])) <= state.room
    for _, group in groups:  # a group is taken from its front
        keys = {w.key for w in group} & set(placed)
        assert keys == {w.key for w in group[: len(keys)]}
    # Keyless or unheld work never waits while a worker has room.
    free = sum(s.room for s in states) - len(placed)
    keyless = [w.key for prefix, group in groups if prefix is None for w in group]
    if free > 0:
        assert set(keyless) <= set(placed)
    # A holder below capacity is never kept from its prefix's items (the last batch
    # withholds prefetch only).
    for prefix, group in groups:
        left = {w.key for w in group} - set(placed)
        for state in states:
            if prefix is None or not left or state.slot not in holders.get(prefix, ()):
                continue
            now = state.outstanding + len(plan.get(state.slot, []))
            assert now >= state.capacity or len(plan.get(state.slot, [])) == state.room


# --- the memory -------------------------------------------------------------------------


def test_holders_are_forgotten_with_their_worker():
    affinity = Affinity()
    affinity.hold(0, 7)
    affinity.hold(1, 7)
    affinity.forget_slot(0)
    assert affinity.holders == {7: {1}}
    affinity.forget_slot(1)
    assert affinity.holders == {}


def test_a_worker_is_remembered_holding_its_latest_prefixes():
    affinity = Affinity()
    for prefix in range(placement.HELD_PREFIXES_PER_SLOT + 1):
        affinity.hold(0, prefix)
    assert 0 not in affinity.holders
    assert len(affinity.by_slot[0]) == placement.HELD_PREFIXES_PER_SLOT


def test_what_results_found_cached_becomes_the_estimate():
    affinity = Affinity()
    assert affinity.shared(7, 128) == 128
    affinity.learn(7, 400)
    assert affinity.shared(7, 128) == 400
    assert affinity.shared(None, 128) == 0


def test_a_higher_tier_is_placed_first():
    interactive = [Waiting(100, 10, 0, 2)]
    plan = plan_placement(slots(1, room=1), [(None, interactive), (None, items(0, 5))], {}, 1.0)
    assert plan[0] == [(100, 12)]


def test_a_prefix_in_two_tiers_goes_to_one_home():
    groups = [(7, items(0, 1)), (None, items(10, 1)), (7, items(20, 1))]
    plan = plan_placement(slots(3), groups, {}, 1.0)
    homes = {slot for slot, placed in plan.items() for k, _ in placed if k in (0, 20)}
    assert len(homes) == 1
