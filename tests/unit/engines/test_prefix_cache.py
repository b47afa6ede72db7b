"""The prefix cache's bookkeeping (daemon/engines/prefix.py): chains, hits, LRU."""

from __future__ import annotations

from exgen.daemon.engines.prefix import PrefixCache, shared_prefixes


def filled(block: int, capacity: int, *prompts: list[int]) -> PrefixCache[int]:
    cache: PrefixCache[int] = PrefixCache(block, capacity)
    for tokens in prompts:
        cache.insert(tokens, lambda i: i)
    return cache


def test_a_prompt_reuses_the_longest_cached_chain_of_whole_blocks() -> None:
    cache = filled(4, 100, list(range(12)))
    assert len(cache) == 3
    hit = cache.match([*range(10), 99, 98])  # shares 10 tokens: 2 whole blocks
    assert [b.value for b in hit] == [0, 1]
    assert cache.stats.lookups == 1 and cache.stats.hits == 1


def test_the_last_token_of_a_prompt_is_never_a_hit() -> None:
    cache = filled(4, 100, list(range(12)))
    assert len(cache.match(list(range(12)))) == 2  # 11 usable tokens: 2 blocks
    assert len(cache.match(list(range(13)))) == 3


def test_a_block_is_known_by_its_whole_prefix_not_its_own_tokens() -> None:
    cache = filled(4, 100, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.match([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []  # second block equal, first not


def test_a_miss_counts_as_a_lookup_not_a_hit() -> None:
    cache = filled(4, 100, [1, 2, 3, 4, 5])
    cache.match([7, 7, 7, 7, 7])
    assert (cache.stats.lookups, cache.stats.hits) == (1, 0)


def test_insert_adds_only_missing_blocks() -> None:
    cache = filled(4, 100, list(range(8)))
    made: list[int] = []
    added = cache.insert([*range(8), 50, 51, 52, 53, 54], lambda i: made.append(i) or i)
    assert added == 1 and made == [2] and len(cache) == 3


def test_eviction_takes_chain_ends_first_and_keeps_the_budget() -> None:
    cache = filled(2, 6, [1, 2, 3, 4, 5, 6])  # 3 blocks: full
    cache.insert([1, 2, 9, 9], lambda i: i)  # a new branch after the first block
    assert len(cache) == 3
    # The old chain's end went; its head, shared with the new branch, stayed.
    assert len(cache.peek([1, 2, 3, 4, 5, 6, 0])) == 2
    assert len(cache.peek([1, 2, 9, 9, 0])) == 2


def test_a_recent_hit_survives_eviction() -> None:
    cache = filled(2, 4, [1, 2, 3, 4], [5, 6, 7, 8])  # the second pushed the first out
    assert cache.peek([1, 2, 3, 4, 0]) == []
    cache = filled(2, 6, [1, 2, 3, 4])
    cache.insert([5, 6], lambda i: i)
    cache.match([1, 2, 3, 4, 0])  # touched: now newer than [5, 6]
    cache.insert([7, 8], lambda i: i)
    assert len(cache.peek([1, 2, 3, 4, 0])) == 2 and cache.peek([5, 6, 0]) == []


def test_no_capacity_caches_nothing() -> None:
    cache = filled(4, 3, list(range(12)))
    assert len(cache) == 0 and cache.match(list(range(13))) == []


def test_shared_prefixes_are_the_longest_block_aligned_ones_not_cached() -> None:
    cache: PrefixCache[int] = PrefixCache(2, 100)
    few_shot = [1, 2, 3, 4, 5, 6]
    prompts = [[*few_shot, 10], [*few_shot, 11, 12], [1, 2, 3, 4, 9, 9, 9], [7, 7, 7]]
    # [1..6] is shared by two prompts, [1..4] by three: one prefill of [1..6] caches both.
    assert shared_prefixes(cache, prompts) == [few_shot]
    cache.insert(few_shot, lambda i: i)
    assert shared_prefixes(cache, prompts) == []


def test_shared_prefixes_keep_separate_branches() -> None:
    cache: PrefixCache[int] = PrefixCache(2, 100)
    prompts = [[1, 2, 3, 4, 0], [1, 2, 3, 4, 1], [1, 2, 5, 6, 0], [1, 2, 5, 6, 1]]
    assert sorted(shared_prefixes(cache, prompts)) == [[1, 2, 3, 4], [1, 2, 5, 6]]


def test_a_prompt_shared_with_nobody_is_not_prefilled_twice() -> None:
    cache: PrefixCache[str] = PrefixCache(2, 100)
    assert shared_prefixes(cache, [["a", "b", "c"], ["x", "y", "z"]]) == []
