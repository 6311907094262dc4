"""nccl-tests import: every output format in the wild parses to the numbers it prints, and a
profile built from it serves those numbers back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from calibration.nccl_tests import import_nccl_tests, parse_nccl_tests, parse_text
from estimator.base.errors import ConfigError
from estimator.profile.profiles import load_profile, profile_from_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nccl-tests"

# file → [(kind, ranks, nodes, curve key, rows, first time_s, last time_s)]: the first and last
# times are read off the file by eye (in-place half for all-reduce/broadcast, out-of-place else)
EXPECTED = {
    "all_reduce_perf.h100x8.txt": [("all_reduce", 8, 1, "8", 25, 23.57e-6, 671.74e-6)],
    "all_gather_perf.2x8.mpirun.txt": [("all_gather", 16, 2, "2x8", 19, 39.84e-6, 801.6e-6)],
    "all_reduce_perf.a100.2-and-4.txt": [("all_reduce", 2, 1, "2", 24, 15.09e-6, 325.8e-6),
                                         ("all_reduce", 4, 1, "4", 24, 18.66e-6, 478.2e-6)],
    "sendrecv_perf.a100x2.txt": [("p2p", 2, 1, "2", 23, 9.42e-6, 243.8e-6)],
    "broadcast_perf.v100x8.txt": [("broadcast", 8, 1, "8", 22, 12.54e-6, 156.5e-6)],
    "reduce_scatter_perf.h200x8.json": [("reduce_scatter", 8, 1, "8", 21, None, None)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fixture_parses_to_its_printed_numbers(name):
    runs = parse_nccl_tests(FIXTURES / name)
    assert [(r.kind, r.nranks, r.nodes, r.group, len(r.rows)) for r in runs] == [e[:5] for e in EXPECTED[name]]
    for run, (*_, first, last) in zip(runs, EXPECTED[name]):
        assert run.rows.size_bytes.is_monotonic_increasing
        if first is not None:
            assert run.rows.time_s.iloc[0] == pytest.approx(first, rel=1e-9)
            assert run.rows.time_s.iloc[-1] == pytest.approx(last, rel=1e-9)


def test_json_output_reads_the_in_place_or_out_of_place_half():
    doc = json.loads((FIXTURES / "reduce_scatter_perf.h200x8.json").read_text())
    run, = parse_nccl_tests(FIXTURES / "reduce_scatter_perf.h200x8.json")
    assert run.rows.time_s.tolist() == pytest.approx([r["out_of_place"]["time"] * 1e-6 for r in doc["results"]])
    assert run.versions == {"nccl": "22703"}


def test_versions_come_from_the_header():
    run, = parse_nccl_tests(FIXTURES / "all_reduce_perf.h100x8.txt")
    assert run.versions == {"nccl-tests": "2.19.6", "nccl": "22907"}


FIRST_FORMAT = """\
# Using devices
#   Rank  0 on   host-1 device  0 [0x04] Tesla P100-SXM2-16GB
#   Rank  1 on   host-1 device  1 [0x05] Tesla P100-SXM2-16GB
#                                          out-of-place                    in-place
#       bytes             N    type      op     time  algbw  busbw      res     time  algbw  busbw      res
       16384          4096   float     sum    0.046   0.36  0.36    0e+00    0.045   0.36  0.36    0e+00
     1048576        262144   float     sum    0.112   9.36  9.36    0e+00    0.110   9.53  9.53    0e+00
 Out of bounds values : 0 OK
"""


def test_the_first_format_prints_milliseconds():
    run, = parse_text(FIRST_FORMAT, "first.txt", kind="all_reduce")
    assert run.rows.time_s.tolist() == pytest.approx([0.045e-3, 0.110e-3])


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines(keepends=True)


@pytest.mark.parametrize("edit,match", [
    (lambda ls: ls[:22] + ["          64            16     float     sum      -1    oops\n"] + ls[22:],
     r"bad\.txt:23: 6 columns"),
    (lambda ls: ls[:22] + ["         abc  junk\n"] + ls[22:], r"bad\.txt:23: not a results row: 'abc  junk'"),
    (lambda ls: [ls[i].replace("       0\n", "       3\n") if i == 20 else ls[i] for i in range(len(ls))],
     r"bad\.txt:21: 3 wrong elements"),
    (lambda ls: [x for x in ls if not x.lstrip("#").strip().startswith(("size", "(B)"))],
     r"no nccl-tests results table"),
])
def test_malformed_text_names_file_and_line(tmp_path, edit, match):
    path = tmp_path / "bad.txt"
    path.write_text("".join(edit(_lines("all_reduce_perf.h100x8.txt"))))
    with pytest.raises(ConfigError, match=match):
        parse_nccl_tests(path)


def test_without_rank_lines_the_group_comes_from_nccl_info_or_nthread_ngpus():
    lines = [x for x in _lines("all_gather_perf.2x8.mpirun.txt") if "Rank" not in x]
    info = [f"node-{h}:{20311 + r}:{20390 + r} [{r}] NCCL INFO comm 0x55d1c3a0 rank {8 * (h == 'b') + r} nranks 16 "
            f"cudaDev {r} busId 18000 commId 0x7a1c2b3d4e5f6071 - Init COMPLETE\n" for h in "ab" for r in range(8)]
    run, = parse_text("".join(lines[:3] + info + lines[3:]), "all_gather_perf.log")
    assert (run.nranks, run.nodes, run.group) == (16, 2, "2x8")
    lines = [x for x in _lines("all_reduce_perf.h100x8.txt") if "Rank" not in x]
    run, = parse_text("".join(lines), "all_reduce_perf.log")  # nThread 1 nGpus 8: one process
    assert (run.nranks, run.nodes, run.group) == (8, 1, "8")


EXCERPT = FIXTURES / "all_reduce_perf.excerpt.txt"  # nThread 1 nGpus 1, no Rank lines, as users paste


def _with_factor(kind_factor: float, name: str, tmp_path: Path) -> Path:
    """The excerpt's table with each busbw rewritten as algbw × ``kind_factor`` (2 decimals)."""
    out = []
    for line in EXCERPT.read_text().splitlines(keepends=True):
        tokens = line.split()
        if tokens and tokens[0].isdigit():
            for at in (7, 11):  # busbw of each half, after time and algbw
                tokens[at] = f"{float(tokens[at - 1]) * kind_factor:.2f}"
            line = "  ".join(tokens) + "\n"
        out.append(line)
    path = tmp_path / name
    path.write_text("".join(out))
    return path


def test_an_excerpt_without_rank_lines_takes_its_group_from_busbw_over_algbw(tmp_path):
    """all-reduce busbw = algbw·2(n−1)/n (1.75 at 8 ranks); all-gather and reduce-scatter
    algbw·(n−1)/n: the group size comes back from the ratio, and the profile says so."""
    run, = parse_nccl_tests(EXCERPT)
    assert (run.kind, run.nranks, run.nodes, run.group) == ("all_reduce", 8, 1, "8")
    assert "inferred from busbw/algbw = 1.750" in run.ranks_from and "2(n−1)/n" in run.ranks_from
    for kind, factor, n in (("all_gather", 3 / 4, 4), ("reduce_scatter", 15 / 16, 16), ("all_reduce", 1.0, 2)):
        got, = parse_nccl_tests(_with_factor(factor, f"{kind}_perf.txt", tmp_path))
        assert (got.kind, got.nranks, got.group) == (kind, n, str(n))
    doc = import_nccl_tests([EXCERPT], copy.deepcopy(load_profile("a100-80g").raw), "a100-pasted")
    entry = doc["links"]["intra"]["all_reduce"]
    assert set(entry["curves"]) == {"8"} | set(load_profile("a100-80g").raw["links"]["intra"]["all_reduce"]
                                              .get("curves", {}))
    assert "all_reduce_perf.excerpt.txt: 8 ranks inferred from busbw/algbw = 1.7500" in entry["cite"]
    row = run.rows.iloc[-2]  # a large message: the curve gives back the measured time
    assert profile_from_dict(doc).collective_s("all_reduce", row.size_bytes, 8) == pytest.approx(row.time_s, rel=0.03)


def test_ranks_given_for_an_excerpt_are_checked_against_what_the_output_says(tmp_path):
    run, = parse_nccl_tests(EXCERPT, ranks=8)
    assert run.nranks == 8 and run.ranks_from.startswith("given by --ranks 8, as busbw/algbw = 1.7500 says")
    with pytest.raises(ConfigError, match=r"--ranks 4 contradicts busbw/algbw = 1\.7500, a all_reduce of 8 ranks"):
        parse_nccl_tests(EXCERPT, ranks=4)
    with pytest.raises(ConfigError, match=r"--ranks 4 contradicts the Rank lines, which say 8 ranks"):
        parse_nccl_tests(FIXTURES / "all_reduce_perf.h100x8.txt", ranks=4)
    # a broadcast moves each byte once whatever the group: only --ranks can say its size
    lines = [x for x in _lines("broadcast_perf.v100x8.txt") if "Rank" not in x]
    path = tmp_path / "broadcast_perf.txt"
    path.write_text("".join(lines).replace("nGpus 8", "nGpus 1"))
    with pytest.raises(ConfigError, match=r"broadcast's busbw equals its algbw whatever the group: pass --ranks N"):
        parse_nccl_tests(path)
    run, = parse_nccl_tests(path, ranks=8)
    assert (run.nranks, run.group) == (8, "8") and run.ranks_from.startswith("given by --ranks 8 (no Rank lines")
    # a ratio no whole group size has is refused, not rounded
    with pytest.raises(ConfigError, match=r"busbw/algbw = 1\.7000 fits no whole group size"):
        parse_nccl_tests(_with_factor(1.7, "all_reduce_perf.txt", tmp_path))


def test_unnamed_output_needs_a_telling_file_name(tmp_path):
    path = tmp_path / "results.log"
    path.write_text((FIXTURES / "sendrecv_perf.a100x2.txt").read_text())
    with pytest.raises(ConfigError, match=r"cannot tell which nccl-tests binary wrote .*sendrecv_perf"):
        parse_nccl_tests(path)
    assert parse_nccl_tests(path, kind="p2p")[0].kind == "p2p"


def test_malformed_json_names_the_entry(tmp_path):
    doc = json.loads((FIXTURES / "reduce_scatter_perf.h200x8.json").read_text())
    doc["results"][3]["out_of_place"].pop("time")
    doc["results"][3]["in_place"].pop("time")
    path = tmp_path / "reduce_scatter_perf.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"results\[3\]: needs size"):
        parse_nccl_tests(path)
    path.write_text("{\"results\": [")
    with pytest.raises(ConfigError, match=r"reduce_scatter_perf\.json:1: not valid JSON"):
        parse_nccl_tests(path)


def test_import_builds_a_profile_that_serves_the_measurements(tmp_path):
    base = copy.deepcopy(load_profile("h100-sxm").raw)
    files = [FIXTURES / n for n in sorted(EXPECTED)]
    doc = import_nccl_tests(files, base, "h100-cluster")
    prof = profile_from_dict(json.loads(json.dumps(doc)))  # round-trips through JSON
    assert prof.name == "h100-cluster" and doc["format"] == "rlhf-plan/profile-v2"
    assert doc["compute"] == base["compute"] and doc["memory"] == base["memory"]
    assert doc["links"]["intra"]["all_reduce"]["curves"].keys() == {"2", "4", "8"}
    assert "all_reduce_perf.h100x8.txt" in doc["links"]["intra"]["all_reduce"]["cite"]
    assert doc["software"]["nccl-tests"] == "2.19.6"
    # a large message, far from the noise: the curve gives back the measured time
    run, = parse_nccl_tests(FIXTURES / "all_reduce_perf.h100x8.txt")
    row = run.rows.iloc[-3]
    assert prof.collective_s("all_reduce", row.size_bytes, 8) == pytest.approx(row.time_s, rel=0.03)
    # the multi-node all-gather is a curve of its own: no hierarchical composition
    ag, = parse_nccl_tests(FIXTURES / "all_gather_perf.2x8.mpirun.txt")
    big = ag.rows.iloc[-2]
    assert prof.group_collective_s("all_gather", big.size_bytes, 8, 2) == pytest.approx(big.time_s, rel=0.03)
    assert prof.group_collective_s("all_gather", big.size_bytes, 4, 2) != pytest.approx(big.time_s, rel=0.03)
    # kinds the files do not measure keep the base's figures
    assert doc["links"]["inter"]["p2p"] == base["links"]["inter"]["p2p"]
    # the multi-node curve alone cannot serve one rank per node: the datasheet pair stays beside it
    assert {"alpha_s", "busbw_bytes_per_s", "curves"} <= set(doc["links"]["inter"]["all_gather"])
