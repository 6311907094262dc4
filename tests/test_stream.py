"""Streaming rollouts (estimator.spec.stream): admission under η, the switch, consumption."""

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.spec.stream import stream_engine


def _stream(gens, eta=1, cap=0, group=1, recompute=True):
    n = len(gens[0])
    prompts = [np.ones(n, dtype=np.int64) for _ in gens]
    return stream_engine(prompts, [np.array(g) for g in gens], [(0, n)] * len(gens), eta, group, cap,
                         recompute=recompute)


def test_next_iteration_starts_behind_the_tail_and_the_first_finished_are_consumed():
    # cap 2: the long response of iteration 0 runs while iteration 1's short ones come and go
    s = _stream([[5, 1], [1, 1], [1, 1]])
    seg0 = s.run.segments[0]
    assert seg0.prefill == (0, 1, 2, 3)  # iteration 1's prompts admitted behind the tail; 4 (iteration 2) waits
    assert seg0.finished == (1, 2, 3, 0) and seg0.steps == 4
    assert s.run.segments[1].switch == 1 and s.run.segments[1].prefill == (4, 5)
    assert s.consumed == ((1, 2), (3, 0), (4, 5))  # first finished, first trained on
    assert [list(s.staleness(j)) for j in range(3)] == [[0, 0], [1, 1], [1, 1]]
    assert s.switch_segment == (1,)


def test_the_switch_waits_for_the_engines_share_and_recomputes_the_running():
    # cap 5, 3 rows an iteration: the first request of iteration 2 (needs version 1) meets the
    # gate after 2 requests finished; the switch must wait for a third (the update needs them)
    s = _stream([[9, 9, 9], [2, 3, 9], [1, 1, 1]], cap=5)
    segs = s.run.segments
    assert segs[0].prefill == (0, 1, 2, 3, 4) and segs[0].finished == (3,)
    assert segs[1].prefill == (5,) and segs[1].finished == (4,)
    assert segs[2].prefill == () and segs[2].steps == 6 and segs[2].finished == (0, 1, 2)  # gated: decode only
    assert segs[3].switch == 1 and segs[3].preempted == (5,) and segs[3].steps == 0  # evicted at the switch
    assert segs[4].prefill == (5, 6, 7, 8) and segs[4].prefill_tokens == (9, 1, 1, 1)  # 1 + 8 tokens again
    assert s.consumed == ((3, 4, 0), (1, 2, 5), (6, 7, 8))
    assert list(s.admitted_version) == [0] * 6 + [1] * 3
    assert [int(s.staleness(j).max()) for j in range(3)] == [0, 1, 1]


def test_keep_mode_switches_without_evicting():
    s = _stream([[9, 9, 9], [2, 3, 9], [1, 1, 1]], cap=5, recompute=False)
    assert not any(seg.preempted for seg in s.run.segments)
    (sw,) = [seg for seg in s.run.segments if seg.switch >= 0]
    assert sw.switch == 1 and sw.prefill == (6, 7, 8)


def test_groups_are_consumed_whole():
    # two groups of two an iteration; group (0, 1) ends with its long member, after group (2, 3)
    s = _stream([[1, 7, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], cap=0, group=2)
    assert s.consumed[0] == (2, 3, 4, 5)
    assert s.consumed[1][:2] in ((6, 7), (0, 1)) and sorted(s.consumed[0] + s.consumed[1]) == list(range(8))


def test_staleness_grows_for_an_overtaken_response():
    # η 1, cap 1: request 0 of iteration 0 is long but first; with no cap the long one is overtaken
    s = _stream([[9, 1], [1, 1], [1, 1], [1, 1]], eta=2)
    assert s.consumed[0] == (1, 2)
    late = [j for j in range(4) if 0 in s.consumed[j]]
    assert late == [2] and int(s.staleness(2).max()) == 2  # admitted under version 0, trained on in 2


def test_bad_streams_are_refused():
    with pytest.raises(ConfigError, match="max_staleness ≥ 1"):
        _stream([[1, 1]], eta=0)
    with pytest.raises(ConfigError, match="multiple of the group size 2"):
        stream_engine([np.ones(3)], [np.ones(3)], [(0, 3)], 1, group=2)
