"""The software stack a plan is priced for: this project's executor, or a production stack.

The same plan costs very different times on different software: this project's eager executor
dispatches dozens of aten ops per block with float32 norm upcasts and generates with its own
loop, while a production RL stack trains with fused Megatron-Core or FSDP2 kernels and generates
with vLLM (continuous batching, CUDA graphs, a scheduler of its own), and between the two it
moves weights and sleeps the engine. An experiment names the stack (``cluster.stack``); the
profile holds the numbers each stack's own costs take on a device (``stacks.<name>`` in the
profile file, :mod:`estimator.profile.stacks`).

==============  =========  ==============  ==========  =============================================
stack           op census  trainer         generation  what else it does (each charged by the estimator)
==============  =========  ==============  ==========  =============================================
executor        executor   this project's  its own     nothing beyond the census (the CPU reference)
megatron-vllm   fused      Megatron-Core   vLLM        sequence packing; a colocated engine sleeps and
                                                       the trainer offloads its state to the host while
                                                       it generates; the refit gathers the whole model
fsdp-vllm       fused      PyTorch FSDP2   vLLM        the same around a DTensor (FSDP2) trainer, whose
                                                       gradients are reduce-scattered in float32 and
                                                       whose float32 master weights the refit gathers
==============  =========  ==============  ==========  =============================================

The production stacks are described as NVIDIA NeMo-RL v0.3.0 runs them (github.com/NVIDIA-NeMo/RL,
tag v0.3.0, commit b1c86a81): ``examples/configs/grpo_math_1B.yaml`` turns on
``sequence_packing`` (``modified_first_fit_decreasing`` into ``train_mb_tokens`` /
``logprob_mb_tokens`` bins) and ``colocated.enabled``; ``nemo_rl/algorithms/grpo.py``'s
``refit_policy_generation`` offloads the optimizer before the refit
(``offload_before_refit``), wakes the engine's weights, sends them over CUDA IPC in buckets and
offloads the policy's weights after it (``offload_after_refit``), and ``finish_generation``
puts vLLM to sleep (level 1: weights to host memory, KV cache dropped); the policy's weights
come back for the log-probs (``prepare_for_lp_inference``), its optimizer state for training
(``prepare_for_training``), and the frozen reference's weights, kept in host memory, are
swapped in for its log-probs (``use_reference_model``). ``get_weights_ipc_handles`` gathers
every parameter whole (tensor-parallel all-gather, pipeline broadcast; DTensor
``full_tensor``) before vLLM loads its shard, so every engine device receives the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.base.errors import ConfigError, did_you_mean

EXECUTOR = "executor"
MEGATRON_VLLM, FSDP_VLLM = "megatron-vllm", "fsdp-vllm"  # the production stacks
# How a trainer cuts a token budget into micro-batches (experiment key cluster.micro_batching):
# "packed" concatenates rows without padding (NeMo-RL sequence_packing, Megatron's packed
# sequences); "dynamic" sorts a rank's rows by length and pads each micro-batch to its longest,
# rounded up to DYNAMIC_ROUND (NeMo-RL dynamic_batching); "padded" takes rows in order, padded to
# the longest (this project's executor)
MICRO_BATCHING = ("packed", "dynamic", "padded")
# NeMo-RL dynamic_batching.sequence_length_round (docs/design-docs/sequence-packing-and-dynamic-
# batching.md, examples/configs/grpo_math_8B.yaml: 64)
DYNAMIC_ROUND = 64
DEFAULT_GPU_STACK = MEGATRON_VLLM  # the stack a GPU experiment is priced on unless it names one


@dataclass(frozen=True)
class Stack:
    """What one software stack does, as far as its costs go (the numbers are the profile's)."""

    name: str
    ops: str  # the op census it charges: executor (aten ops) | fused (one entry per fused kernel)
    trainer: str  # executor | megatron | fsdp
    engine: str  # executor | vllm
    words: str  # how outputs name it
    # train and inference micro-batches are packed sequences (no padding; NeMo-RL sequence_packing)
    packing: bool = False
    # a generation engine on devices training uses sleeps while they train, and the trainer keeps
    # its optimizer state (and weights between calls) in host memory while the engine generates
    colocated_offload: bool = False
    # bytes per element of a fully sharded trainer's gradient reduce-scatters (0: the profile's
    # element, as its all-gathers): FSDP2 as NeMo-RL v0.3.0 wraps it reduces in float32
    # (nemo_rl/models/dtensor/parallelize.py at b1c86a81: MixedPrecisionPolicy(param_dtype=bf16,
    # reduce_dtype=torch.float32))
    reduce_bytes: int = 0
    # bytes per element of the weights the refit gathers whole (0: the profile's element): the
    # FSDP2 trainer of NeMo-RL v0.3.0 keeps float32 master weights (dtensor_policy_worker.py at
    # b1c86a81 loads the model with torch_dtype=torch.float32), and get_weights_ipc_handles
    # gathers each with full_tensor() before casting it to bfloat16; Megatron-Core gathers its
    # bfloat16 weights
    refit_bytes: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)!r} must be one of {allowed}"
                    for k, allowed in (("ops", ("executor", "fused")), ("trainer", ("executor", "megatron", "fsdp")),
                                       ("engine", ("executor", "vllm"))) if getattr(self, k) not in allowed]
        if problems:
            raise ConfigError(f"stack {self.name!r}: " + "; ".join(problems))

    @property
    def micro_batching(self) -> str:
        """How it cuts micro-batches unless the experiment says (:data:`MICRO_BATCHING`)."""
        return "packed" if self.packing else "padded"

    @property
    def production(self) -> bool:
        """Whether a serving engine and a production trainer run the calls (not this project's executor)."""
        return self.engine == "vllm"


STACKS: dict[str, Stack] = {s.name: s for s in (
    Stack(EXECUTOR, "executor", "executor", "executor", "this project's eager executor"),
    Stack(MEGATRON_VLLM, "fused", "megatron", "vllm", "Megatron-Core training with vLLM generation",
          packing=True, colocated_offload=True),
    Stack(FSDP_VLLM, "fused", "fsdp", "vllm", "PyTorch FSDP2 (DTensor) training with vLLM generation",
          packing=True, colocated_offload=True, reduce_bytes=4, refit_bytes=4),
)}
STACK_NAMES = tuple(STACKS)


def priced_stack(name: str | None) -> Stack:
    """The stack a profile prices (its ``stack``; None: this project's executor)."""
    return STACKS[name or EXECUTOR]


def get_stack(name: str, key: str = "cluster.stack") -> Stack:
    """The stack called ``name``; an unknown name is a :class:`ConfigError` naming ``key``."""
    if not isinstance(name, str) or name not in STACKS:
        shown = name if isinstance(name, str) else repr(name)
        raise ConfigError(f"{key}={shown!r} is not a stack{did_you_mean(str(name), STACK_NAMES)}; "
                          f"known: {', '.join(STACK_NAMES)}")
    return STACKS[name]
