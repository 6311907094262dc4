"""The RLHF math: log-probs, advantages and losses, as pure functions of batch tensors.

Shapes: ``b`` rows (sequences) of ``s = P + G`` tokens, ``P`` prompt and ``G`` response
tokens; every response has exactly ``G`` tokens (the workloads are exact), so no masks.

Conventions the whole executor shares:

- Response token ``t`` (``0 ≤ t < G``) sits at position ``P + t`` and is predicted by the
  logits at position ``P + t − 1``; the critic's value of the state before token ``t`` is
  read at that same position. A reward model's score is its value at the last position.
- Advantages and returns are a function of one sequence's data only (no batch whitening),
  so any data-parallel split and any micro-batching computes the same numbers. GRPO is the
  exception that needs whole groups: its train call receives the full (tiny) rewards vector.
- Every loss takes ``norm``, the count of tokens (or sequences, or pairs) of the *whole
  minibatch*, and returns ``sum(per-item loss) / norm`` for the rows it is given. Summed over
  micro-batches and data-parallel ranks this is exactly the minibatch mean, so every plan
  computes the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def response_logp(logits: Tensor, seq: Tensor, prompt_len: int, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of the response tokens: ``(b, s, V)``, ``(b, s)`` → ``(b, G)``."""
    logp = F.log_softmax(logits[:, prompt_len - 1:-1] / temperature, dim=-1)  # (b, G, V)
    return logp.gather(-1, seq[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


def token_logp(logits: Tensor, token: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``token`` (b,) under one step's ``logits`` (b, V)."""
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)


def response_values(values: Tensor, prompt_len: int) -> Tensor:
    """Critic values of the states before each response token: ``(b, s)`` → ``(b, G)``."""
    return values[:, prompt_len - 1:-1]


def sequence_reward(values: Tensor) -> Tensor:
    """A reward model's score of each sequence: its value at the last token, ``(b, s)`` → ``(b,)``."""
    return values[:, -1]


def kl_shaped_rewards(old_logp: Tensor, ref_logp: Tensor, reward: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``r_t = −kl_coef·(old_logp_t − ref_logp_t)``, plus the sequence
    reward at the last token (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022). ``(b, G)``."""
    r = -kl_coef * (old_logp - ref_logp)
    r[:, -1] += reward
    return r


def reverse_discount(x: Tensor, factor: float) -> Tensor:
    """``y_t = Σ_{j≥t} factor^{j−t}·x_j`` along the last axis: the recurrence
    ``y_t = x_t + factor·y_{t+1}`` (``y`` past the end 0) as one product with the triangular
    matrix of powers, not a Python loop over positions (a loop costs a dispatch per position
    and op, which on a CPU outweighs the arithmetic). Powers that underflow are zero."""
    g = x.shape[-1]
    pos = torch.arange(g, device=x.device)
    lag = (pos[:, None] - pos[None, :]).to(x.dtype)  # j − t at [j, t]
    weights = torch.where(lag >= 0, torch.tensor(factor, dtype=x.dtype, device=x.device) ** lag,
                          torch.zeros((), dtype=x.dtype, device=x.device))
    return x @ weights


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438), per sequence.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` with ``V_G = 0`` (the episode ends with the response),
    ``A_t = δ_t + γλ·A_{t+1}``; returns ``R_t = A_t + V_t``. Inputs and outputs ``(b, G)``.
    """
    next_v = torch.nn.functional.pad(values[:, 1:], (0, 1))
    adv = reverse_discount(rewards + gamma * next_v - values, gamma * lam)
    return adv, adv + values


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = Σ_{t'≥t} γ^{t'−t}·r_{t'}`` per sequence, ``(b, G)``."""
    return reverse_discount(rewards, gamma)


def ppo_advantages(old_logp: Tensor, ref_logp: Tensor, reward: Tensor, values: Tensor,
                   kl_coef: float, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """PPO's advantages and returns from KL-shaped rewards and the critic's old values."""
    return gae(kl_shaped_rewards(old_logp, ref_logp, reward, kl_coef), values, gamma, lam)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """Per-token PPO clipped objective, negated (Schulman et al. 2017, arXiv 1707.06347, eq. 7):
    ``−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)`` with ``ρ = exp(logp − old_logp)``."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)


def ppo_actor_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_eps: float, norm: int) -> Tensor:
    """PPO actor loss of a micro-batch: clipped surrogate summed over its tokens ÷ ``norm``
    (the minibatch's token count). The KL penalty is in the rewards (:func:`kl_shaped_rewards`)."""
    return clipped_surrogate(logp, old_logp, adv, clip_eps).sum() / norm


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, value_clip: float, norm: int) -> Tensor:
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017): per token
    ``½·max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)``, summed ÷ ``norm``."""
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return per_token.sum() / norm


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, §4.1.2):
    rows ``k·n .. k·n + n − 1`` are the ``n = group_size`` samples of prompt ``k``, and each gets
    ``(r − mean_group) / (std_group + eps)`` (sample std; 0 for a group of one). ``(B·n,)`` → same."""
    groups = rewards.view(-1, group_size)  # (B, n)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Unbiased, non-negative per-token KL estimate of π against π_ref (Schulman 2020, used by
    DeepSeekMath eq. 4): ``exp(ref − logp) − (ref − logp) − 1``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, adv: Tensor, clip_eps: float,
              kl_coef: float, norm: int) -> Tensor:
    """GRPO loss (DeepSeekMath eq. 3): per token the clipped surrogate with the sequence's
    group-normalised advantage plus ``kl_coef·KL_k3(π‖π_ref)``, summed ÷ ``norm`` (tokens of
    the minibatch; responses have equal length, so this is the paper's mean of means)."""
    per_token = clipped_surrogate(logp, old_logp, adv.unsqueeze(-1).expand_as(logp), clip_eps)
    return (per_token + kl_coef * k3_kl(logp, ref_logp)).sum() / norm


def remax_returns(old_logp: Tensor, ref_logp: Tensor, reward: Tensor, greedy_reward: Tensor,
                  kl_coef: float, gamma: float) -> Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Alg. 1) returns: KL-shaped per-token rewards whose
    final reward is ``r(x, y) − r(x, ȳ)``, the greedy response ``ȳ``'s reward as the baseline;
    reward-to-go per token. ``(b, G)``."""
    shaped = kl_shaped_rewards(old_logp, ref_logp, reward - greedy_reward, kl_coef)
    return discounted_returns(shaped, gamma)


def reinforce_loss(logp: Tensor, returns: Tensor, norm: int) -> Tensor:
    """REINFORCE: ``−Σ_t logπ(y_t)·G_t`` over the micro-batch's tokens ÷ ``norm`` (Williams 1992)."""
    return -(logp * returns).sum() / norm


def dpo_loss(logp: Tensor, ref_logp: Tensor, beta: float, norm: int) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7). Rows ``2i`` are chosen and ``2i+1``
    rejected responses; per pair
    ``−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])`` with sequence
    log-probs summed over response tokens. Summed over pairs ÷ ``norm`` (pairs of the minibatch)."""
    margin = (logp.sum(-1) - ref_logp.sum(-1)).view(-1, 2)  # (pairs, [chosen, rejected])
    return -F.logsigmoid(beta * (margin[:, 0] - margin[:, 1])).sum() / norm


def sft_loss(logp: Tensor, norm: int) -> Tensor:
    """Supervised fine-tuning: cross-entropy of the response tokens, summed ÷ ``norm`` (tokens)."""
    return -logp.sum() / norm


def reward_model_loss(scores: Tensor, norm: int) -> Tensor:
    """Pairwise reward-model loss (Bradley–Terry; InstructGPT, Ouyang et al. 2022, eq. 1): rows
    ``2i`` chosen, ``2i+1`` rejected, per pair ``−log σ(r_w − r_l)``, summed ÷ ``norm`` (pairs)."""
    pairs = scores.view(-1, 2)  # (pairs, [chosen, rejected])
    return -F.logsigmoid(pairs[:, 0] - pairs[:, 1]).sum() / norm
