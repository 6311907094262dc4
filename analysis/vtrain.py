"""vTrain's published A100 training runs: its table format, the setting behind it, and how a
row becomes an experiment and a plan of this project.

vTrain (Bang et al., "vTrain", MICRO 2024; github.com/VIA-Research/vTrain, commit f8dda847)
released the iteration times it validated against, measured with Megatron-DeepSpeed on A100
GPUs: 1,440 runs on one node (``data/ground_truth_single.csv``) and 109 on 64 to 512 GPUs
(``data/ground_truth_multi.csv``), both copied with vTrain's LICENSE into ``analysis/data/vtrain/``.
A table has the columns ``# GPUs, global batch, micro batch, hidden size, attention heads, #
layers, sequence length, tensor parallelism, data parallelism, pipeline parallelism, iteration
time (ms)``, optionally led by ``Parameters (billion)``, optionally after a UTF-8 byte-order
mark. The setting, from vTrain's configuration defaults (``src/config.py``) and validation
configs: a GPT-3-style decoder (vocabulary 50,257, LayerNorm, GELU MLP of 4·hidden, learned
positions, biases, multi-head attention, tied embeddings), mixed precision, full activation
checkpointing, 1F1B, nodes of 8 GPUs, 150 GB/s intra-node and 800 Gb/s per node inter-node.
A row whose tensor parallelism is wider than a node (the multi-node table's tp = 16) is laid out
with ``tp_across_nodes``, as Megatron runs it. :func:`parse_rows` keeps going past a row it
cannot read and says why; :func:`row_experiment` names a row the plan rules refuse, so a table
is predicted row by row and such rows are skipped with their reason.

:func:`vtrain_profile` derives the cluster profile of that setting from a base A100 profile.
Collectives the base holds measured curves for keep them (vTrain, too, reads measured NCCL
tables for groups of up to 8 GPUs and uses the 150 GB/s only beyond); the others take 150 GB/s
bus bandwidth inside a node, and 800 Gb/s shared by the node's 8 GPUs between nodes, converted
as vTrain's predictor converts (``src/predictor.py``: 1 GB = 2^30 B); ``replace_curves`` uses
the stated figures for every collective. Its ``trainer`` section (:data:`TRAINER`,
:mod:`estimator.profile.trainer`) is the software vTrain measured: Megatron's unfused attention
(vTrain's traced model, ``src/model/gpt_modeling.py``: ``baddbmm``, the fused scale-mask-softmax,
attention dropout, ``bmm``), logits kept split over the tensor-parallel group with Megatron's
vocab-parallel cross entropy (``ShardedGptLogit`` gathers nothing), gradients all-reduced from
one contiguous buffer, and a fused Adam (``src/model/fused_adam.py``) whose traffic, unfitted,
is the least a mixed-precision Adam step moves (:data:`ADAM_BYTES_PER_PARAM`).
"""

from __future__ import annotations

import copy
import datetime
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError
from estimator.base.loading import MAX_DATA_BYTES, read_text
from estimator.profile.profiles import Profile
from estimator.profile.trainer import Trainer, trainer_dict
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout, Plan, check
from estimator.spec.workflow import WorkflowParams

PARAMS_COLUMN = "Parameters (billion)"
# vTrain's header → field of VTrainRow
COLUMNS = {
    "# GPUs": "gpus", "global batch": "global_batch", "micro batch": "micro_batch",
    "hidden size": "hidden", "attention heads": "heads", "# layers": "layers",
    "sequence length": "seq_len", "tensor parallelism": "tp", "data parallelism": "dp",
    "pipeline parallelism": "pp", "iteration time (ms)": "measured_ms",
}
GPT_VOCAB = 50257  # GPT-2/GPT-3 BPE vocabulary (vTrain src/config.py vocab_size default)
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (default 128)
# times the tensor-parallel degree (Megatron-LM megatron/training/tokenizer _vocab_size_with_padding)
VOCAB_MULTIPLE = 128
GPUS_PER_NODE = 8  # vTrain src/config.py node_size default
DEFAULT_PROFILE = "a100-vtrain"

VTRAIN_SOURCE = ("vTrain (Bang et al., MICRO 2024), github.com/VIA-Research/vTrain commit f8dda847, "
                 "src/config.py defaults")
GiB_BINARY = 2 ** 30  # vTrain's predictor reads its GB and Gb as 2^30 (src/predictor.py)
# A mixed-precision Adam step in one fused pass reads the fp32 gradient, master weight and two
# moments (16 B) and writes the master weight and moments (12 B) and the 16-bit model weight
# (2 B) per parameter (Micikevicius et al., "Mixed Precision Training", ICLR 2018; Kingma & Ba 2015)
ADAM_BYTES_PER_PARAM = 30.0
# Megatron's mixed-precision optimizer step: unscale and check the gradients, their norm, Adam,
# the copy to the model's 16-bit weights, each one multi-tensor kernel (Megatron-LM
# megatron/optimizer/optimizer.py, MixedPrecisionOptimizer.step)
OPTIMIZER_LAUNCHES = 4
TRAINER = Trainer("Megatron-DeepSpeed (vTrain's runs)", attention="unfused", cross_entropy="vocab_parallel",
                  grad_buffer="contiguous", optimizer_bytes_per_param=ADAM_BYTES_PER_PARAM,
                  optimizer_launches=OPTIMIZER_LAUNCHES)
TRAINER_CITE = (f"{VTRAIN_SOURCE.split(', src/')[0]}: the traced model src/model/gpt_modeling.py (CoreAttention "
                "as Megatron's: baddbmm, FusedScaleMaskSoftmax, attention dropout 0.1, bmm; ShardedGptLogit keeps "
                "the logits vocab-split) and src/model/fused_adam.py; the loss is Megatron's vocab-parallel cross "
                "entropy (Shoeybi et al. 2019, arXiv:1909.08053 §3); gradients all-reduced from one contiguous "
                "buffer (Megatron-LM DistributedDataParallel)")
OPTIMIZER_CITE = (f"{ADAM_BYTES_PER_PARAM:g} B per parameter: the least a mixed-precision Adam step moves, fp32 "
                  "gradient, master weight and moments read, master weight and moments written, the 16-bit weight "
                  "written (Micikevicius et al., ICLR 2018); 4 multi-tensor kernels (unscale, norm, Adam, copy: "
                  "Megatron-LM megatron/optimizer/optimizer.py)")


@dataclass(frozen=True)
class VTrainRow:
    """One measured run of vTrain's table."""

    row: int  # 1-based data row (line row + 1 of the file)
    gpus: int
    global_batch: int  # sequences per iteration
    micro_batch: int  # sequences per micro-batch
    hidden: int
    heads: int
    layers: int
    seq_len: int  # tokens per sequence
    tp: int
    dp: int
    pp: int
    measured_s: float  # measured iteration time, seconds
    params_billion: float | None = None  # the table's own parameter count, when given

    @property
    def micro_batches(self) -> int:
        """Micro-batches per data-parallel rank in one iteration."""
        return self.global_batch // (self.dp * self.micro_batch)

    def config(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("gpus", "global_batch", "micro_batch", "hidden", "heads", "layers",
                                              "seq_len", "tp", "dp", "pp")}

# ---- the table ----------------------------------------------------------------------------


def _integer(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} must be a positive integer") from None
    if not math.isfinite(value) or not value.is_integer() or value < 1:
        raise ConfigError(f"{where}={text!r} must be a positive integer")
    return int(value)


def _positive(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} must be a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}={text!r} must be a positive number")
    return value


def parse_row(values: dict[str, str], row: int) -> VTrainRow:
    """One data row (header → text) checked: positive integers, a positive time, dp·tp·pp equal
    to the GPUs and a global batch that splits into dp·micro-batch pieces."""
    fields = {}
    for col, name in COLUMNS.items():
        where = f"row {row}: column {col!r}"
        text = str(values[col]).strip()
        fields[name] = _positive(text, where) if name == "measured_ms" else _integer(text, where)
    params = None
    if PARAMS_COLUMN in values:
        params = _positive(str(values[PARAMS_COLUMN]).strip(), f"row {row}: column {PARAMS_COLUMN!r}")
    f = fields
    if f["dp"] * f["tp"] * f["pp"] != f["gpus"]:
        raise ConfigError(f"row {row}: column '# GPUs'={f['gpus']} must equal data·tensor·pipeline parallelism "
                          f"= {f['dp']}·{f['tp']}·{f['pp']} = {f['dp'] * f['tp'] * f['pp']}")
    if f["global_batch"] % (f["dp"] * f["micro_batch"]):
        raise ConfigError(f"row {row}: column 'global batch'={f['global_batch']} must be divisible by "
                          f"data parallelism · micro batch = {f['dp']}·{f['micro_batch']} "
                          f"= {f['dp'] * f['micro_batch']}")
    measured_ms = f.pop("measured_ms")
    return VTrainRow(row=row, measured_s=measured_ms / 1e3, params_billion=params, **f)


@dataclass(frozen=True)
class Skipped:
    """A row of a table that was not predicted, and why."""

    row: int  # 1-based data row
    reason: str  # one line naming the column or rule

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "reason": self.reason}


def parse_table(text: str, where: str = "table") -> list[VTrainRow]:
    """Every row of a table in vTrain's column format (a leading byte-order mark is dropped);
    the first bad row is refused, naming row and column."""
    rows, skipped = parse_rows(text, where)
    if skipped:
        raise ConfigError(f"{where}: row {skipped[0].row}: {skipped[0].reason}")
    return rows


def parse_rows(text: str, where: str = "table") -> tuple[list[VTrainRow], list[Skipped]]:
    """The rows of a table in vTrain's column format that parse, and those that do not with
    the reason (:func:`parse_row`'s message); a table whose header or CSV is wrong, or that has
    no rows, is refused whole."""
    import pandas as pd

    text = text.removeprefix("\ufeff")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid CSV table: {' '.join(str(exc).split())}") from None
    table.columns = [str(c).strip() for c in table.columns]
    expected = list(COLUMNS)
    if list(table.columns) not in (expected, [PARAMS_COLUMN, *expected]):
        missing = [c for c in expected if c not in table.columns]
        extra = [c for c in table.columns if c not in expected and c != PARAMS_COLUMN]
        raise ConfigError(f"{where}: columns must be vTrain's {expected} (optionally led by {PARAMS_COLUMN!r})"
                          + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                          + ("" if missing or extra else "; the order differs"))
    if table.empty:
        raise ConfigError(f"{where}: the table has no rows")
    rows, skipped = [], []
    for i, rec in enumerate(table.to_dict("records")):
        try:
            rows.append(parse_row(rec, i + 1))
        except ConfigError as exc:
            skipped.append(Skipped(i + 1, str(exc).removeprefix(f"row {i + 1}: ")))
    return rows, skipped


def load_table(path: str | Path) -> list[VTrainRow]:
    return parse_table(read_text(path, "vTrain table", MAX_DATA_BYTES), where=f"vTrain table {path}")


def load_rows(path: str | Path) -> tuple[list[VTrainRow], list[Skipped]]:
    """:func:`parse_rows` of a file."""
    return parse_rows(read_text(path, "vTrain table", MAX_DATA_BYTES), where=f"vTrain table {path}")


# ---- row → experiment and plan --------------------------------------------------------------


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary Megatron allocates: ``vocab`` rounded up to a multiple of 128·tp."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab // multiple) * multiple


# the GPT-3 block's features and the ModelSpec field that expresses each
GPT_FEATURES = {"norm": "layernorm", "mlp": "gelu", "positions": "learned", "bias": True}


def gpt_model(row: VTrainRow) -> tuple[ModelSpec, dict[str, str]]:
    """The GPT-3-style model of a row and, per model feature, how it was honoured: multi-head
    attention, GELU MLP of 4·hidden, LayerNorm, learned positions (as many as the sequence),
    biases, tied input and output embeddings (GPT-3 / Megatron GPT)."""
    h = row.hidden
    notes = {name: f"{value} (honoured)" for name, value in GPT_FEATURES.items()}
    notes["vocab"] = f"{GPT_VOCAB} padded to a multiple of {VOCAB_MULTIPLE}·tp (Megatron)"
    notes["tied_embeddings"] = "honoured"
    spec = ModelSpec(f"gpt-h{h}-l{row.layers}", row.layers, h, 4 * h, row.heads, row.heads,
                     padded_vocab(GPT_VOCAB, row.tp), tied_embeddings=True, max_positions=row.seq_len,
                     **GPT_FEATURES)
    return spec, notes


def row_experiment(row: VTrainRow, device: str = DEFAULT_PROFILE) -> tuple[Experiment, Plan, dict[str, str]]:
    """The SFT experiment and plan of one row, with notes on which features were honoured.

    One train call over ``global batch`` sequences of ``sequence length`` tokens (the loss on
    all but the first), one optimizer step; the cluster has nodes of 8 GPUs and the call runs
    on the row's first ``# GPUs`` devices with the row's dp/tp/pp and ``global batch / (dp ·
    micro batch)`` micro-batches per data-parallel rank, 1F1B, full activation recompute."""
    try:
        model, notes = gpt_model(row)
        nodes = -(-row.gpus // GPUS_PER_NODE)
        params = WorkflowParams(batch_size=row.global_batch, prompt_len=1, gen_len=row.seq_len - 1)
        experiment = Experiment("sft", {"actor": model}, params, Cluster(nodes, GPUS_PER_NODE, device),
                                name=f"vtrain-row-{row.row}")
        notes["recompute"] = "full (honoured)"
        layout = Layout(DeviceMesh(0, row.gpus), row.dp, row.tp, row.pp, row.micro_batches, recompute="full",
                        tp_across_nodes=row.tp > GPUS_PER_NODE)
        plan = check(Plan({"actor_train": layout}), experiment)
    except ConfigError as exc:
        raise ConfigError(f"row {row.row}: {exc}") from None
    notes["schedule"] = "1F1B (honoured)"
    return experiment, plan, notes


# ---- the cluster profile of vTrain's setting -------------------------------------------------


def vtrain_profile(base: Profile, name: str, intra_GBps: float = 150.0, inter_Gbps: float = 800.0,
                   per_node: int = GPUS_PER_NODE, replace_curves: bool = False, command: str = "") -> dict[str, Any]:
    """The profile document of ``base`` with vTrain's stated link figures (see the module doc)."""
    data = copy.deepcopy(base.raw)
    intra = intra_GBps * GiB_BINARY
    per_gpu = inter_Gbps * GiB_BINARY / 8 / per_node
    cite_intra = (f"{VTRAIN_SOURCE}: intra_node_bandwidth {intra_GBps:g} GB/s, used as all-reduce bus bandwidth "
                  f"(src/predictor.py compute_comm_time, 1 GB = 2^30 B)")
    cite_inter = (f"{VTRAIN_SOURCE}: inter_node_bandwidth {inter_Gbps:g} Gb/s per node (1 Gb = 2^30 bit, "
                  f"src/predictor.py), shared by the node's {per_node} GPUs, one NIC each")
    for cls, busbw, cite in (("intra", intra, cite_intra), ("inter", per_gpu, cite_inter)):
        for kind, node in data["links"][cls].items():
            if not isinstance(node, dict) or ("curves" in node and not replace_curves):
                continue
            alpha = base.links[cls][kind].alpha_s
            data["links"][cls][kind] = {"alpha_s": alpha, "busbw_bytes_per_s": busbw,
                                        "cite": f"{cite}; latency {alpha:.3g} s kept from {base.name}"}
    kept = "measured curves replaced too" if replace_curves else "measured curves of the base kept"
    data["trainer"] = trainer_dict(TRAINER, TRAINER_CITE, OPTIMIZER_CITE)
    data.update(name=name, date=datetime.date.today().isoformat(),
                notes=f"{base.name} with the link figures of vTrain's A100 cluster ({VTRAIN_SOURCE}; {kept}) and "
                      f"the trainer it measured ({TRAINER.words()}). Made by: {command}")
    return data
