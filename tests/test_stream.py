"""Streaming rollouts (estimator.spec.stream): admission under η, the switch, consumption."""

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.spec.stream import stream_engine


def _stream(gens, eta=1, cap=0, group=1, recompute=True, switch_at=()):
    n = len(gens[0])
    prompts = [np.ones(n, dtype=np.int64) for _ in gens]
    return stream_engine(prompts, [np.array(g) for g in gens], [(0, n)] * len(gens), eta, group, cap,
                         recompute=recompute, switch_at=switch_at)


def test_the_next_iteration_starts_behind_the_tail_and_the_first_finished_are_consumed():
    # no cap, η 1: iteration 1's prompts are admitted with iteration 0's (version 0 serves both);
    # the long response of iteration 0 is overtaken by iteration 1's short ones
    s = _stream([[5, 1], [1, 1], [1, 1]], switch_at=(5,))
    seg0 = s.run.segments[0]
    assert seg0.prefill == (0, 1, 2, 3)  # request 4 (iteration 2) needs version 1
    assert seg0.finished == (1, 2, 3, 0) and seg0.steps == 4
    assert s.run.segments[1].switch == 1 and s.run.segments[1].prefill == (4, 5)
    assert s.consumed == ((1, 2), (3, 0), (4, 5))  # first finished, first trained on
    assert [list(s.staleness(j)) for j in range(3)] == [[0, 0], [1, 1], [1, 1]]
    assert s.switch_at == (5,) and s.emit_op == (1, 5, 6)


def test_without_its_switch_point_the_stream_stops_where_it_needs_the_update():
    s = _stream([[5, 1], [1, 1], [1, 1]])
    assert not s.complete and s.run.waiting == 1
    assert len(s.consumed) == 2 and s.switch_at == ()


def test_admission_waits_for_the_version_while_decoding_goes_on_and_the_switch_recomputes():
    # cap 5, 3 rows an iteration, η 1: request 6 (iteration 2) needs version 1, which comes after
    # 13 ops — in the middle of request 5's decode steps, which go on meanwhile
    s = _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, switch_at=(13,))
    segs = s.run.segments
    assert segs[0].prefill == (0, 1, 2, 3, 4) and segs[0].finished == (3,)  # ops 1 (prefill) and 2
    assert segs[1].prefill == (5,) and segs[1].finished == (4,)  # ops 3, 4
    assert segs[2].prefill == () and segs[2].steps == 6 and segs[2].finished == (0, 1, 2)  # gated: decode only
    assert segs[3].prefill == () and segs[3].steps == 3 and segs[3].finished == ()  # cut at the switch point
    assert segs[4].switch == 1 and segs[4].preempted == (5,)  # the running request evicted
    # request 5 prefilled again under version 1 with its tokens (1 prompt + 11 generated), then 6, 7, 8
    assert segs[5].prefill == (5, 6, 7, 8) and segs[5].prefill_tokens == (12, 1, 1, 1)
    assert list(s.admitted_version) == [0] * 6 + [1] * 3  # a re-prefill keeps the version of admission
    assert s.consumed == ((3, 4, 0), (1, 2, 6), (7, 8, 5))
    assert s.emit_op == (10, 14, 22) and s.switch_at == (13,)
    assert [list(s.staleness(j)) for j in range(3)] == [[0, 0, 0], [1, 1, 0], [1, 1, 2]]  # 5 was overtaken


def test_keep_mode_switches_without_evicting():
    s = _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, recompute=False, switch_at=(13,))
    assert not any(seg.preempted for seg in s.run.segments)
    (sw,) = [seg for seg in s.run.segments if seg.switch >= 0]
    assert sw.switch == 1 and sw.prefill == (6, 7, 8)  # request 5 keeps its slot and its keys and values


def test_a_switch_before_the_engines_share_is_done_is_refused():
    # after 6 ops only requests 3 and 4 finished: the update of iteration 0 still waits for a third
    with pytest.raises(ConfigError, match="fewer than its share"):
        _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, switch_at=(6,))


def test_groups_are_consumed_whole():
    # two groups of two an iteration; group (0, 1) ends with its long member, after group (2, 3)
    s = _stream([[1, 7, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], group=2, switch_at=(7,))
    assert s.consumed[0] == (2, 3, 4, 5)
    assert sorted(s.consumed[0] + s.consumed[1]) == list(range(8))


def test_staleness_grows_for_an_overtaken_response():
    # η 2: request 0 of iteration 0 is long; iterations 1 and 2's short ones overtake it
    s = _stream([[9, 1], [1, 1], [1, 1], [1, 1]], eta=2, switch_at=(9,))
    assert s.consumed[0] == (1, 2)
    late = [j for j in range(4) if 0 in s.consumed[j]]
    assert late == [2] and int(s.staleness(2).max()) == 2  # admitted under version 0, trained on in 2


def test_bad_streams_are_refused():
    with pytest.raises(ConfigError, match="max_staleness ≥ 1"):
        _stream([[1, 1]], eta=0)
    with pytest.raises(ConfigError, match="multiple of the group size 2"):
        stream_engine([np.ones(3)], [np.ones(3)], [(0, 3)], 1, group=2)
