"""Read NVIDIA nccl-tests output and turn it into a profile's collective curves.

Cluster users already run ``all_reduce_perf``, ``all_gather_perf``, ``broadcast_perf``,
``reduce_scatter_perf`` and ``sendrecv_perf`` (github.com/NVIDIA/nccl-tests); their output is
the best measurement of a cluster's collectives there is. :func:`parse_nccl_tests` reads

- text output of every generation of the printing code: the current header (``size count
  type redop root time algbw busbw #wrong``, out-of-place then in-place, since NCCL 2.13),
  the per-test headers before it (``error`` instead of ``#wrong``; ``redop`` only for
  reductions, ``root`` only for broadcast), and the first one (``bytes N type op ... res``,
  times in ms); ``N/A`` error counts; ``[1,0]<stdout>:`` prefixes from mpirun; NCCL log lines
  inside the table; several runs in one log (repeated header blocks);
- ``-J`` JSON output (format version 3 of nccl-tests 2.17 on).

The group comes from the ``#  Rank N Group G Pid P on HOST device D ...`` lines (or the JSON
``devices``): ranks per group, and hosts for the number of nodes. Without them, NCCL_DEBUG=INFO
``... nranks N ... Init COMPLETE`` lines give the ranks (their host prefixes the hosts), and
failing those ``# nThread T nGpus G`` with T·G > 1 gives T·G ranks of one process on one host.
An excerpt users paste from an MPI run (one GPU per process: ``nThread 1 nGpus 1``, no ``Rank``
lines) says nothing of the group: its size is then ``ranks=N`` (``--ranks N`` on the command
line) or inferred from the table itself, whose bus bandwidth is the algorithm bandwidth times
the collective's bus factor (nccl-tests doc/PERFORMANCE.md): ``busbw = algbw·2(n−1)/n`` for
all-reduce, ``algbw·(n−1)/n`` for all-gather and reduce-scatter, so ``n = 2/(2 − r)`` and
``n = 1/(1 − r)`` for the ratio ``r = busbw/algbw`` (a broadcast's factor is 1: it needs
``--ranks``). Such a group is taken as one node. :attr:`NcclRun.ranks_from` says where a run's
group size came from, and the profile's ``cite`` repeats it. A run on several hosts becomes a
multi-node curve ``"<nodes>x<per_node>"`` of ``links.inter``.
:func:`import_nccl_tests` builds a profile from a base profile and such files.

    python -m estimator.calibrate --import-nccl-tests all_reduce_perf.txt sendrecv_perf.txt \
        --base h100-sxm --name h100-mycluster
    python -m estimator.calibrate --import-nccl-tests broadcast_excerpt.txt --ranks 8 \
        --base h100-sxm --name h100-mycluster
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from estimator.base.errors import ConfigError
from estimator.profile.collectives import fit_time_curve, merge_entry
from estimator.profile.profiles import PROFILE_FORMAT, profile_from_dict

# nccl-tests binary → collective kind of the profile
BINARIES = {"all_reduce": "all_reduce", "all_gather": "all_gather", "broadcast": "broadcast",
            "reduce_scatter": "reduce_scatter", "sendrecv": "p2p"}
# Which half of a row the executor's call resembles: torch's all_reduce and broadcast work in
# place; all_gather fills separate outputs; a send and a receive are separate buffers.
IN_PLACE = {"all_reduce": True, "broadcast": True, "all_gather": False, "reduce_scatter": False, "p2p": False}
COLUMN_NAMES = {"size": "size", "bytes": "size", "count": "count", "n": "count", "type": "type",
                "redop": "redop", "op": "redop", "root": "root"}
_PREFIX = re.compile(r"^\[\d+,\d+\]<std(?:out|err)>:\s?")
_RANK = re.compile(r"^#\s+Rank\s+(\d+)\s+(?:Group\s+(\d+)\s+)?(?:Pid\s+\d+\s+)?on\s+(\S+)\s+device")
_STARTING = re.compile(r"^#\s*Collective test starting:\s*(\S+)")
_VERSION = re.compile(r"^#\s*nccl-tests version (\S+) nccl-headers=\d+ nccl-library=(\d+)")
_NTHREAD = re.compile(r"^#\s*nThread (\d+) nGpus (\d+)")
_INFO_NRANKS = re.compile(r"^([^:\s]+):\d+:\d+ .*NCCL INFO .*\bnranks (\d+)\b")


@dataclass(frozen=True)
class NcclRun:
    """One results table of one nccl-tests binary."""

    path: str  # file it was read from
    kind: str  # profile collective kind
    nranks: int  # ranks in the communicator
    nodes: int  # distinct hosts among them
    rows: pd.DataFrame  # size_bytes, time_s (the half the executor resembles), busbw_GBps, algbw_GBps, line
    versions: dict[str, str]  # nccl-tests / NCCL versions when the output names them
    ranks_from: str = "Rank lines"  # where nranks came from (RANK_SOURCES' words, with the figures)

    @property
    def link_class(self) -> str:
        return "inter" if self.nodes > 1 else "intra"

    @property
    def group(self) -> str:
        """The curve key: ranks on one node, ``"2"`` for a point-to-point pair, ``"<nodes>x<per_node>"``."""
        if self.kind == "p2p":
            return "2"  # sendrecv: each rank sends to its ring successor as it receives from its predecessor
        if self.nodes <= 1:
            return str(self.nranks)
        per_node = self.nranks // self.nodes
        return str(self.nodes) if per_node == 1 else f"{self.nodes}x{per_node}"


def _kind_from(name: str, path: str, where: str) -> str:
    stem = Path(name).name.lower().replace("-", "_")
    for binary, kind in BINARIES.items():
        if binary in stem or binary.replace("_", "") in stem:
            return kind
    raise ConfigError(f"{where}: cannot tell which nccl-tests binary wrote {path!r}: name the file after it "
                      f"(e.g. all_reduce_perf.txt) or keep its '# Collective test starting' line; "
                      f"supported: {', '.join(b + '_perf' for b in BINARIES)}")


# busbw / algbw of an n-rank collective → n (nccl-tests doc/PERFORMANCE.md); broadcast and
# send/receive move each byte once whatever n, so their ratio (1) says nothing
STATED = ("Rank lines", "NCCL INFO lines", "nThread·nGpus of one process", "devices list")
_FROM_RATIO = {"all_reduce": lambda r: 2.0 / (2.0 - r), "all_gather": lambda r: 1.0 / (1.0 - r),
               "reduce_scatter": lambda r: 1.0 / (1.0 - r)}
_FACTOR_WORDS = {"all_reduce": "2(n−1)/n", "all_gather": "(n−1)/n", "reduce_scatter": "(n−1)/n"}
MIN_ALGBW_GBPS = 1.0  # rows slower than this print too few digits for the ratio
RATIO_TOLERANCE = 0.2  # the inferred n may be this far from a whole number


def ranks_from_ratio(rows: pd.DataFrame, kind: str, where: str) -> tuple[int, float]:
    """``(n, r)``: the group size whose bus factor is the table's ``r = busbw/algbw`` (median
    over rows of at least :data:`MIN_ALGBW_GBPS`), or :class:`ConfigError` saying to pass
    ``--ranks`` where the kind's factor does not depend on n or no whole n fits."""
    if kind not in _FROM_RATIO:
        raise ConfigError(f"{where}: no '#  Rank N' lines and no nThread·nGpus above 1, and a {kind}'s busbw "
                          f"equals its algbw whatever the group: pass --ranks N (the ranks the run used)")
    fast = rows[(rows.algbw_GBps >= MIN_ALGBW_GBPS) & (rows.busbw_GBps > 0)]
    if fast.empty:
        raise ConfigError(f"{where}: no '#  Rank N' lines and no row of at least {MIN_ALGBW_GBPS:g} GB/s to infer "
                          "the group size from busbw/algbw: pass --ranks N")
    r = float((fast.busbw_GBps / fast.algbw_GBps).median())
    n = _FROM_RATIO[kind](r) if r < (2.0 if kind == "all_reduce" else 1.0) else float("inf")
    if not (n < 1e6 and abs(n - round(n)) <= RATIO_TOLERANCE and round(n) >= 2):
        raise ConfigError(f"{where}: busbw/algbw = {r:.4f} fits no whole group size of a {kind} "
                          f"(busbw = algbw·{_FACTOR_WORDS[kind]}): pass --ranks N")
    return int(round(n)), r


def _resolve_ranks(stated: tuple[int, int, str] | None, rows: pd.DataFrame, kind: str, given: int | None,
                   where: str) -> tuple[int, int, str]:
    """(ranks, hosts, where the ranks came from): the output's own statement where it makes
    one (``stated``), else ``given`` (``--ranks``), else the busbw/algbw ratio; a given size
    that contradicts either is refused. A send/receive run's curve is a pair whatever its ring."""
    if stated is not None:
        if given is not None and given != stated[0]:
            raise ConfigError(f"{where}: --ranks {given} contradicts the {stated[2]}, which say {stated[0]} ranks")
        return stated
    excerpt = "no Rank lines; taken as one node"
    if given is None and kind == "p2p":
        return 2, 1, f"as a send/receive pair ({excerpt})"
    if given is None:
        n, r = ranks_from_ratio(rows, kind, where)
        return n, 1, f"inferred from busbw/algbw = {r:.4f} = {_FACTOR_WORDS[kind]} at n = {n} ({excerpt})"
    try:
        n, r = ranks_from_ratio(rows, kind, where)
    except ConfigError:  # the ratio cannot check the given size (a broadcast, too few digits)
        return given, 1, f"given by --ranks {given} ({excerpt})"
    if n != given:
        raise ConfigError(f"{where}: --ranks {given} contradicts busbw/algbw = {r:.4f}, a {kind} of {n} ranks "
                          f"(busbw = algbw·{_FACTOR_WORDS[kind]})")
    return given, 1, f"given by --ranks {given}, as busbw/algbw = {r:.4f} says ({excerpt})"


def _group_shape(ranks: dict[int, tuple[int, str]], fallback: tuple[int, int] | None, where: str) -> tuple[int, int]:
    """(ranks per communicator, hosts) from rank → (group, host), else from ``fallback``."""
    if not ranks:
        if fallback:
            return fallback
        raise ConfigError(f"{where}: no '#  Rank N ... on HOST device D' lines: the group size is unknown")
    groups: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for g, host in ranks.values():
        groups.setdefault(g, set()).add(host)
        sizes[g] = sizes.get(g, 0) + 1
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"{where}: groups of unequal size {sorted(sizes.values())} (NCCL_TESTS_SPLIT)")
    g0 = min(groups)
    return sizes[g0], len(groups[g0])


class _TextTable:
    """Columns of one header block."""

    def __init__(self, names: list[str], where: str):
        lead = []
        for name in names:
            if name in ("time", "cputime"):
                break
            if name.lower() not in COLUMN_NAMES:
                raise ConfigError(f"{where}: unknown column {name!r} in the header")
            lead.append(COLUMN_NAMES[name.lower()])
        self.lead = lead
        rest = names[len(lead):]
        self.width = rest.index(rest[0], 1) if rest.count(rest[0]) > 1 else len(rest)  # one half's columns
        if "size" not in lead or self.width < 3 or rest[1:3] != ["algbw", "busbw"]:
            raise ConfigError(f"{where}: header {' '.join(names)!r} is not an nccl-tests results header")
        self.ms = names[0] == "bytes"  # the first printing code gave times in milliseconds
        # '#wrong' counts wrong elements; the older 'error'/'res' columns hold the largest
        # numeric deviation, which reduced-precision sums make non-zero in a correct run
        self.counts_wrong = self.width > 3 and rest[3] == "#wrong"


def _parse_row(tokens: list[str], table: _TextTable, in_place: bool, where: str) -> dict[str, Any]:
    first = len(table.lead)
    if len(tokens) < first + table.width:
        raise ConfigError(f"{where}: {len(tokens)} columns, a row needs at least {first + table.width}")
    base = first + table.width if in_place and len(tokens) >= first + 2 * table.width else first
    try:
        size = int(tokens[0])
        t = float(tokens[base]) * (1e-3 if table.ms else 1e-6)
        algbw, busbw = float(tokens[base + 1]), float(tokens[base + 2])
        wrong = tokens[base + 3] if table.counts_wrong else "N/A"
        bad = 0.0 if wrong == "N/A" else float(wrong)
    except ValueError:
        raise ConfigError(f"{where}: not a results row: {' '.join(tokens)!r}") from None
    if not t > 0:
        raise ConfigError(f"{where}: time {tokens[base]} must be positive")
    if bad > 0:
        raise ConfigError(f"{where}: {wrong} wrong elements: a run that fails its check is no measurement")
    return {"size_bytes": size, "time_s": t, "busbw_GBps": busbw, "algbw_GBps": algbw}


def _stated(ranks: dict[int, tuple[int, str]], info: dict[str, int], local: tuple[int, int] | None
            ) -> tuple[int, int, str] | None:
    """(ranks, hosts, source) where the output states its group: Rank lines, NCCL INFO lines,
    or one process driving nThread·nGpus > 1 GPUs; None where it does not (an excerpt)."""
    if ranks:
        return (*_group_shape(ranks, None, ""), "Rank lines")
    if info:
        return max(info.values()), len(info), "NCCL INFO lines"
    if local is not None and local[0] > 1:
        return local[0], 1, "nThread·nGpus of one process"
    return None


def parse_text(text: str, path: str = "<text>", kind: str | None = None, ranks: int | None = None) -> list[NcclRun]:
    """Every results table in the text output of nccl-tests; ``ranks``: the group size of a
    run whose output does not state it (see the module docstring)."""
    runs: list[NcclRun] = []
    ranks_seen: dict[int, tuple[int, str]] = {}
    program, table, rows, versions = None, None, [], {}
    local: tuple[int, int] | None = None  # nThread × nGpus of one process, on one host
    info: dict[str, int] = {}  # host → nranks, from NCCL_DEBUG=INFO 'Init COMPLETE' lines

    def close(lineno: int) -> None:
        nonlocal table, rows
        if table is not None and rows:
            k = kind or _kind_from(program or path, path, f"{path}:{lineno}")
            frame = pd.DataFrame(rows)
            n, hosts, source = _resolve_ranks(_stated(ranks_seen, info, local), frame, k, ranks, f"{path}:{lineno}")
            runs.append(NcclRun(path, k, n, hosts, frame, dict(versions), source))
        table, rows = None, []

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _PREFIX.sub("", raw).rstrip()
        where = f"{path}:{lineno}"
        if line.lstrip("#").strip().startswith(("Out of bounds", "Avg bus bandwidth")):
            close(lineno)  # the footer (with '#' since 2019, without before)
            continue
        if line.startswith("#"):
            body = line.lstrip("#").split()
            if (m := _STARTING.match(line)) or (t := _NTHREAD.match(line)):
                close(lineno)  # a new run: its devices follow
                program, ranks_seen = (m.group(1) if m else program), {}
                if not m:
                    local, info = (int(t.group(1)) * int(t.group(2)), 1), {}
            elif m := _VERSION.match(line):
                versions = {"nccl-tests": m.group(1), "nccl": m.group(2)}
            elif m := _RANK.match(line):
                ranks_seen[int(m.group(1))] = (int(m.group(2) or 0), m.group(3))
            elif body[:1] in (["size"], ["bytes"]) and "algbw" in body:
                close(lineno)
                table = _TextTable(body, where)
            continue
        if "NCCL" in line:  # NCCL_DEBUG log lines, also inside the table
            if m := _INFO_NRANKS.match(line):
                info[m.group(1)] = int(m.group(2))
            continue
        tokens = line.split()
        if table is None or not tokens:
            continue
        if not tokens[0].isdigit():
            raise ConfigError(f"{where}: not a results row: {line.strip()!r}")
        row = _parse_row(tokens, table, IN_PLACE[kind or _kind_from(program or path, path, where)], where)
        rows.append({**row, "line": lineno})
    close(len(text.splitlines()))
    if not runs:
        raise ConfigError(f"{path}: no nccl-tests results table (a '#  size  count  type ...' header "
                          "followed by rows)")
    return runs


def parse_json(data: Any, path: str = "<json>", kind: str | None = None, ranks: int | None = None) -> list[NcclRun]:
    """The ``-J`` JSON output of nccl-tests (format version 3); ``ranks`` as :func:`parse_text`."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ConfigError(f"{path}: not nccl-tests JSON output (needs a 'results' list)")
    args = data.get("args") or []
    k = kind or _kind_from(str(args[0]) if args else path, path, path)
    devices = (data.get("config") or {}).get("devices") or []
    try:
        seen = {int(d["rank"]): (int(d.get("group", 0)), str(d["hostname"])) for d in devices}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: config.devices entries need 'rank' and 'hostname'") from None
    rows = []
    half = "in_place" if IN_PLACE[k] else "out_of_place"
    for i, r in enumerate(data["results"]):
        where = f"{path}: results[{i}]"
        try:
            body = r.get(half) or r.get("in_place")
            t = float(body.get("time", body.get("cpu_time")))
            size, busbw, wrong = int(r["size"]), float(body["bus_bw"]), body.get("nwrong")
            algbw = float(body.get("alg_bw", body["bus_bw"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: needs size and {half}.time / bus_bw numbers") from None
        if t <= 0:
            raise ConfigError(f"{where}: time {t} must be positive")
        if wrong not in (None, "nan") and float(wrong) > 0:
            raise ConfigError(f"{where}: {wrong} wrong elements: a run that fails its check is no measurement")
        rows.append({"size_bytes": size, "time_s": t * 1e-6, "busbw_GBps": busbw, "algbw_GBps": algbw, "line": i})
    versions = {"nccl": str(data["nccl_version"])} if "nccl_version" in data else {}
    frame = pd.DataFrame(rows)
    stated = (*_group_shape(seen, None, path), "devices list") if seen else None
    n, hosts, source = _resolve_ranks(stated, frame, k, ranks, path)
    return [NcclRun(path, k, n, hosts, frame, versions, source)]


def parse_nccl_tests(path: str | Path, kind: str | None = None, ranks: int | None = None) -> list[NcclRun]:
    """The results tables of one nccl-tests output file (text or ``-J`` JSON); ``ranks``: the
    group size where the output does not state it (:func:`parse_text`)."""
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"nccl-tests output {str(p)!r}: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            return parse_json(json.loads(text), str(p), kind, ranks)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    return parse_text(text, str(p), kind, ranks)


def runs_frame(runs: list[NcclRun]) -> pd.DataFrame:
    """Raw rows of every run: link_class, kind, group, size_bytes, time_s, busbw_GBps, path, line."""
    parts = [r.rows.assign(link_class=r.link_class, kind=r.kind, group=r.group, path=r.path) for r in runs]
    return pd.concat(parts, ignore_index=True)


def import_nccl_tests(files: list[str | Path], base: dict, name: str, ranks: int | None = None) -> dict:
    """A profile document: ``base`` with the curves of every kind measured in ``files`` replaced
    (:func:`read_runs`, then :func:`profile_from_runs`)."""
    return profile_from_runs(read_runs(files, ranks), base, name)


def read_runs(files: list[str | Path], ranks: int | None = None) -> list[NcclRun]:
    """Every run of ``files``; ``ranks``: the group size of runs whose output does not state
    it (``--ranks``)."""
    if not files:
        raise ConfigError("--import-nccl-tests needs at least one nccl-tests output file")
    return [run for f in files for run in parse_nccl_tests(f, ranks=ranks)]


def run_line(run: NcclRun) -> str:
    """One line per run: file, collective, group and where its size came from."""
    return f"{Path(run.path).name}: {run.kind} over {run.nranks} ranks on {run.nodes} node(s), {run.ranks_from}"


def profile_from_runs(runs: list[NcclRun], base: dict, name: str) -> dict:
    """A profile document: ``base`` with the curves of every kind measured in ``runs`` replaced.

    Curves of group sizes the runs do not measure stay as the base has them; an entry keeps
    its α + busbw figures only while it has no single-node curve (multi-node curves alone
    cannot serve a collective inside one node or across one rank per node). An entry's
    ``cite`` names the files and, for a run without Rank lines, where its group size came from.
    """
    frame = runs_frame(runs)
    frame = frame[frame.size_bytes > 0]  # a zero-byte row times the call overhead of nothing
    out = copy.deepcopy(base)
    out.update(format=PROFILE_FORMAT, name=name)
    versions = {k: v for r in runs for k, v in r.versions.items()}
    out["software"] = {**out.get("software", {}), **versions}
    for (cls, kind), part in frame.groupby(["link_class", "kind"], sort=True):
        srcs = sorted({Path(p).name for p in part.path})
        curves = {group: fit_time_curve(g.size_bytes.to_numpy(), g.time_s.to_numpy())
                  for group, g in part.groupby("group")}
        measured = f"nccl-tests output {', '.join(srcs)} ({'in' if IN_PLACE[kind] else 'out-of'}-place times, " \
                   "pooled by median and fitted monotone by estimator.profile.collectives.fit_time_curve)"
        sizes = sorted({f"{Path(r.path).name}: {r.nranks} ranks {r.ranks_from}" for r in runs
                        if r.link_class == cls and r.kind == kind and r.ranks_from not in STATED})
        measured += "".join(f"; {x}" for x in sizes)
        out["links"][cls][kind] = merge_entry(out["links"][cls][kind], curves, {"cite": measured})
    profile_from_dict(out, where=f"profile {name!r} imported from nccl-tests")  # checks the result
    return out
