"""Call outputs travel from their producer to their consumers as soon as they exist.

Who sends which rows to whom is the pure plan of :func:`estimator.spec.sharding.rows_plan`: the
holders of an output (every tensor-parallel rank of the producer's last stage) cover the rows
each device of a consuming call needs. Everything one device sends another for one (consumer,
data) pair is one message.

A holder *pushes* its messages with non-blocking sends the moment the producing call finishes;
a consumer receives them when it starts. So a producer never waits for its consumers, and calls
on disjoint meshes overlap as far as the dataflow allows. Messages travel on a process group of
their own, so they cannot be confused with pipeline or reallocation traffic between the same
two devices. Within the group, both ends know the exact order in which a sender posts its
messages — producer instances in the order of the devices' program
(:meth:`estimator.spec.workflow.Workflow.program`, where an asynchronous run's rollouts come
η slots ahead of the iteration that reads them), then within one producer as
:func:`message_schedule` lists them (consumers, inputs) — and a receiver posts its receives in
that order (:class:`Mailbox`), which keeps point-to-point matching right without tags (NCCL has
none). A receive is known by (iteration, consumer, data, sender), so the outputs of two
iterations alive at once never mix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan
from estimator.spec.sharding import Range, RowTransfer, data_needs, output_holders, rows_plan
from estimator.spec.workflow import SOURCES, CallInstance, Workflow, push_target
from executor.realloc import gather_rows

Pieces = list[tuple[Range, Tensor]]  # (global row range, those rows)
# The program's call instances in order, as (slot, iteration, call) (Workflow.program, Workflow.slot).
Order = Sequence[tuple[int, int, str]]


@dataclass(frozen=True)
class Message:
    """The rows of ``data`` that ``src`` sends ``dst`` for call ``consumer`` (one iteration)."""

    producer: str
    consumer: str
    data: str
    src: int
    dst: int
    rows: tuple[Range, ...]  # in the order of the consumer's rows plan

    @property
    def num_rows(self) -> int:
        return sum(hi - lo for lo, hi in self.rows)


def input_plan(experiment: Experiment, plan: Plan, consumer: str, data: str) -> list[RowTransfer]:
    wf = experiment.workflow
    producer = wf.producer(data)
    holders = output_holders(wf[producer], plan[producer])
    needs = data_needs(experiment.algorithm, wf[consumer], plan[consumer], data)
    return rows_plan(holders, needs, experiment.cluster.devices_per_node)


def message_schedule(experiment: Experiment, plan: Plan) -> list[Message]:
    """Every message of one iteration in the order senders post them: by producer (global
    order), consumer (global order), input (the consumer's order), then the rows plan."""
    wf = experiment.workflow
    order = wf.topological_order()
    out = []
    for producer in order:
        for consumer in order:
            for data in wf[consumer].inputs:
                if data in SOURCES or wf.producer(data) != producer:
                    continue
                pairs: dict[tuple[int, int], list[Range]] = {}
                for t in input_plan(experiment, plan, consumer, data):
                    if t.src != t.dst:
                        pairs.setdefault((t.src, t.dst), []).append(t.rows)
                out += [Message(producer, consumer, data, s, d, tuple(rows)) for (s, d), rows in pairs.items()]
    return out


class Outbox:
    """Sends a device has posted; their buffers live until the sends complete."""

    def __init__(self, device: int, group: dist.ProcessGroup | None):
        self.device, self.group = device, group
        self.pending: list[tuple[int, dist.Work, Tensor]] = []  # (iteration, work, buffer)

    def push(self, iteration: int, messages: list[Message], held: dict[str, Pieces]) -> None:
        """Post this device's messages of a producer that just finished."""
        for m in messages:
            if m.src == self.device:
                buf = gather_rows(held[m.data], list(m.rows)).contiguous().view(-1)
                self.pending.append((iteration, dist.isend(buf, m.dst, group=self.group), buf))

    def wait(self, before: int | None = None) -> None:
        """Complete the sends of iterations before ``before`` (all when None)."""
        keep = []
        for it, work, buf in self.pending:
            if before is None or it < before:
                work.wait()
            else:
                keep.append((it, work, buf))
        self.pending = keep


def send_order(workflow: Workflow, program: Sequence[CallInstance]) -> list[tuple[int, int, str]]:
    """(slot, iteration, call) of the calls of a program (:meth:`Workflow.program`), in its
    order: the order in which every sender posts its outputs."""
    return [(workflow.slot(n), n.iteration, n.call) for n in program if push_target(n.call) is None]


def _expected(schedule: list[Message], src: int, dst: int, order: Order) -> Iterator[tuple[int, int, Message]]:
    """(slot, iteration, message) of the messages ``src`` sends ``dst``, in the order it sends
    them: its producers' instances in program ``order``, each one's as the schedule lists them."""
    mine = [m for m in schedule if m.src == src and m.dst == dst]
    for slot, it, producer in order:
        for m in mine:
            if m.producer == producer:
                yield slot, it, m


class Mailbox:
    """Receives of one device, posted in each sender's order (see the module docstring).

    With ``ahead`` (gloo), :meth:`post_slot` posts every receive of a slot of the program when
    it begins, so a message lands as soon as its sender posts it, whatever either side computes
    meanwhile; posted one by one when the consumer asks instead, each receive is a fresh
    rendezvous with a sender that may be busy computing, and on a loaded host its transport
    thread answers milliseconds later. NCCL runs a communicator's operations in order on one
    stream, so there receives stay posted on demand."""

    def __init__(self, device: int, schedule: list[Message], order: Order, row_specs: dict,
                 group: dist.ProcessGroup | None, torch_device: torch.device, ahead: bool = False):
        self.device, self.group, self.torch_device = device, group, torch_device
        self.row_specs = row_specs  # data name → (row shape, dtype)
        self.ahead = ahead
        senders = sorted({m.src for m in schedule if m.dst == device})
        # Plain lists, not bound methods: a generator holding ``self`` would make a reference
        # cycle that keeps the process group alive past destroy_process_group, and gloo aborts
        # when it is finally collected at interpreter exit.
        self.expected = {s: list(_expected(schedule, s, device, order)) for s in senders}
        self.next = dict.fromkeys(senders, 0)  # per sender: its next expected message not yet posted
        self.posted: dict[tuple[int, str, str, int], tuple[Message, Tensor, dist.Work]] = {}

    def post_slot(self, slot: int) -> None:
        """With ``ahead``: post every receive of messages produced in ``slot`` (and any earlier left)."""
        if not self.ahead:
            return
        for src, expected in self.expected.items():
            while self.next[src] < len(expected) and expected[self.next[src]][0] <= slot:
                self._post_next(src)

    def _post_next(self, src: int) -> None:
        _, it, m = self.expected[src][self.next[src]]
        self.next[src] += 1
        self._post(it, m)

    def _post(self, it: int, m: Message) -> None:
        shape, dtype = self.row_specs[m.data]
        buf = torch.empty((m.num_rows, *shape), dtype=dtype, device=self.torch_device)
        self.posted[(it, m.consumer, m.data, m.src)] = (m, buf, dist.irecv(buf, m.src, group=self.group))

    def receive(self, it: int, consumer: str, data: str, src: int) -> Pieces:
        """The rows ``src`` sends this device for (iteration, consumer, data), as pieces."""
        key = (it, consumer, data, src)
        while key not in self.posted:
            if self.next[src] >= len(self.expected[src]):
                raise KeyError(f"no message from {src} for {consumer}/{data} in iteration {it}")
            self._post_next(src)
        m, buf, work = self.posted.pop(key)
        work.wait()
        parts = buf.split([hi - lo for lo, hi in m.rows])
        return list(zip(m.rows, parts))


def gather_input(transfers: list[RowTransfer], device: int, it: int, consumer: str, data: str,
                 held: dict[str, Pieces], mailbox: Mailbox) -> Pieces:
    """The pieces of ``data`` this device needs for ``consumer``: its own rows copied, the
    others received."""
    out: Pieces = []
    received: dict[int, Pieces] = {}
    for t in transfers:
        if t.dst != device:
            continue
        if t.src == device:
            out.append((t.rows, gather_rows(held[data], [t.rows]).clone()))
            continue
        if t.src not in received:
            received[t.src] = mailbox.receive(it, consumer, data, t.src)
        out.append(received[t.src].pop(0))
    return out
