"""The RLHF math: log-probs, advantages and losses, as pure functions of batch tensors.

Shapes: ``b`` rows (sequences) of ``s = P + G`` tokens, ``P`` prompt and ``G`` response
tokens. With fixed lengths every response has exactly ``G`` tokens, so no masks. With a length
distribution rows are right-padded to the caps: row b's prompt is ``P_b`` tokens, its response
``L_b`` tokens at positions ``[P_b, P_b + L_b)``; per-token data stays ``G`` wide and the
``*_rows`` helpers, ``mask`` and ``lengths`` arguments use only the real tokens
(:func:`response_mask`).

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


def response_index(prompts: Tensor, gen_len: int, width: int) -> Tensor:
    """Positions of the response tokens of right-padded rows: ``P_b + t`` (b, G) for rows whose
    prompts are ``prompts`` (b,) tokens, clamped into rows ``width`` wide (entries past a row's
    response are never used)."""
    pos = prompts[:, None] + torch.arange(gen_len, device=prompts.device)[None, :]
    return pos.clamp(max=width - 1)


def response_mask(lengths: Tensor, gen_len: int) -> Tensor:
    """Which of the ``gen_len`` response slots of each row hold a real token: ``t < L_b`` (b, G)."""
    return torch.arange(gen_len, device=lengths.device)[None, :] < lengths[:, None]


def response_logp_rows(logits: Tensor, seq: Tensor, prompts: Tensor, gen_len: int,
                       temperature: float = 1.0) -> Tensor:
    """:func:`response_logp` of right-padded rows whose prompts are ``prompts`` (b,) tokens long:
    token ``t`` of row b at position ``P_b + t``, predicted at ``P_b + t − 1``. ``(b, s, V)``,
    ``(b, s)`` → ``(b, gen_len)``, entries past a row's response unused."""
    idx = response_index(prompts.to(logits.device), gen_len, seq.shape[1])  # (b, G)
    picked = logits.gather(1, (idx - 1)[..., None].expand(-1, -1, logits.shape[-1]))  # (b, G, V)
    logp = F.log_softmax(picked / temperature, dim=-1)
    return logp.gather(-1, seq.gather(1, idx).unsqueeze(-1)).squeeze(-1)


def response_values_rows(values: Tensor, prompts: Tensor, gen_len: int) -> Tensor:
    """:func:`response_values` of right-padded rows: the value at ``P_b + t − 1`` (b, gen_len)."""
    return values.gather(1, response_index(prompts.to(values.device), gen_len, values.shape[1]) - 1)


def sequence_reward_at(values: Tensor, ends: Tensor) -> Tensor:
    """A reward model's score of right-padded rows: the value at each one's last token
    ``ends`` (b,) (prompt + response − 1), ``(b, s)`` → ``(b,)``."""
    return values.gather(1, ends.to(values.device)[:, None]).squeeze(1)


def _total(x: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of ``x`` over the real response tokens (all of them without a mask)."""
    return x.sum() if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def token_logp(logits: Tensor, token: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``token`` (b,) under one step's ``logits`` (b, V)."""
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)


def response_values(values: Tensor, prompt_len: int) -> Tensor:
    """Critic values of the states before each response token: ``(b, s)`` → ``(b, G)``."""
    return values[:, prompt_len - 1:-1]


def sequence_reward(values: Tensor) -> Tensor:
    """A reward model's score of each sequence: its value at the last token, ``(b, s)`` → ``(b,)``."""
    return values[:, -1]


def kl_shaped_rewards(old_logp: Tensor, ref_logp: Tensor, reward: Tensor, kl_coef: float,
                      lengths: Tensor | None = None) -> Tensor:
    """Per-token rewards ``r_t = −kl_coef·(old_logp_t − ref_logp_t)``, plus the sequence
    reward at the last token (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022). ``(b, G)``.
    With ``lengths`` (b,) the last token of row b is ``L_b − 1`` and rewards past it are 0."""
    r = -kl_coef * (old_logp - ref_logp)
    if lengths is None:
        r[:, -1] += reward
        return r
    r = torch.where(response_mask(lengths, r.shape[1]), r, torch.zeros((), dtype=r.dtype))
    r[torch.arange(r.shape[0]), lengths - 1] += reward
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
                   kl_coef: float, gamma: float, lam: float, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PPO's advantages and returns from KL-shaped rewards and the critic's old values. With
    ``lengths`` (b,) each episode ends after token ``L_b − 1``: values past it count as 0, so
    ``V_{L_b} = 0`` and nothing past the end reaches the real tokens."""
    if lengths is not None:
        values = torch.where(response_mask(lengths, values.shape[1]), values, torch.zeros((), dtype=values.dtype))
    return gae(kl_shaped_rewards(old_logp, ref_logp, reward, kl_coef, lengths), values, gamma, lam)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """Per-token PPO clipped objective, negated (Schulman et al. 2017, arXiv 1707.06347, eq. 7):
    ``−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)`` with ``ρ = exp(logp − old_logp)``."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)


def ppo_actor_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_eps: float, norm: int,
                   mask: Tensor | None = None) -> Tensor:
    """PPO actor loss of a micro-batch: clipped surrogate summed over its tokens ÷ ``norm``
    (the minibatch's token count). The KL penalty is in the rewards (:func:`kl_shaped_rewards`)."""
    return _total(clipped_surrogate(logp, old_logp, adv, clip_eps), mask) / norm


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, value_clip: float, norm: int,
                mask: Tensor | None = None) -> Tensor:
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017): per token
    ``½·max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)``, summed ÷ ``norm``."""
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return _total(per_token, mask) / norm


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
              kl_coef: float, norm: int, mask: Tensor | None = None) -> Tensor:
    """GRPO loss (DeepSeekMath eq. 3): per token the clipped surrogate with the sequence's
    group-normalised advantage plus ``kl_coef·KL_k3(π‖π_ref)``, summed ÷ ``norm`` (tokens of
    the minibatch; with equal lengths this is the paper's mean of means, with drawn lengths the
    mean over the minibatch's real tokens, as DAPO's token-level loss)."""
    per_token = clipped_surrogate(logp, old_logp, adv.unsqueeze(-1).expand_as(logp), clip_eps)
    return _total(per_token + kl_coef * k3_kl(logp, ref_logp), mask) / norm


def remax_returns(old_logp: Tensor, ref_logp: Tensor, reward: Tensor, greedy_reward: Tensor,
                  kl_coef: float, gamma: float, lengths: Tensor | None = None) -> Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Alg. 1) returns: KL-shaped per-token rewards whose
    final reward is ``r(x, y) − r(x, ȳ)``, the greedy response ``ȳ``'s reward as the baseline;
    reward-to-go per token. ``(b, G)``."""
    shaped = kl_shaped_rewards(old_logp, ref_logp, reward - greedy_reward, kl_coef, lengths)
    return discounted_returns(shaped, gamma)


def reinforce_loss(logp: Tensor, returns: Tensor, norm: int, mask: Tensor | None = None) -> Tensor:
    """REINFORCE: ``−Σ_t logπ(y_t)·G_t`` over the micro-batch's tokens ÷ ``norm`` (Williams 1992)."""
    return -_total(logp * returns, mask) / norm


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
