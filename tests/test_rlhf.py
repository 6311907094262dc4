"""RLHF math: hand-computed values, and the normaliser rule that makes any micro-batching or
data-parallel split compute the same gradient."""

from __future__ import annotations

import math

import pytest
import torch

from executor import rlhf

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_response_logp_reads_the_predicting_position():
    b, p, g, v = 2, 3, 4, 5
    logits = _rand(b, p + g, v)
    seq = torch.randint(0, v, (b, p + g), generator=torch.Generator().manual_seed(1))
    out = rlhf.response_logp(logits, seq, p, temperature=2.0)
    assert out.shape == (b, g)
    for i in range(b):
        for t in range(g):
            expect = torch.log_softmax(logits[i, p + t - 1] / 2.0, -1)[seq[i, p + t]]
            assert out[i, t].item() == pytest.approx(expect.item(), abs=1e-12)


def test_token_logp_matches_response_logp_of_one_step():
    logits = _rand(3, 7)
    tok = torch.tensor([0, 6, 2])
    expect = torch.log_softmax(logits, -1)[torch.arange(3), tok]
    assert torch.allclose(rlhf.token_logp(logits, tok), expect)


def test_values_and_rewards_positions():
    values = torch.arange(10, dtype=D).view(1, 10)
    assert rlhf.response_values(values, 6).tolist() == [[5.0, 6.0, 7.0, 8.0]]
    assert rlhf.sequence_reward(values).tolist() == [9.0]


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    old = torch.tensor([[0.5, 0.2, 0.1]], dtype=D)
    ref = torch.tensor([[0.0, 0.4, 0.1]], dtype=D)
    r = rlhf.kl_shaped_rewards(old, ref, torch.tensor([2.0], dtype=D), kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([-0.05, 0.02, 2.0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0]], dtype=D)
    values = torch.tensor([[0.5, 0.25]], dtype=D)
    gamma, lam = 0.9, 0.8
    d1 = 1.0 - 0.25
    d0 = 0.0 + gamma * 0.25 - 0.5
    adv, ret = rlhf.gae(rewards, values, gamma, lam)
    assert adv[0].tolist() == pytest.approx([d0 + gamma * lam * d1, d1])
    assert ret[0].tolist() == pytest.approx([d0 + gamma * lam * d1 + 0.5, d1 + 0.25])


def test_gae_with_lambda_one_is_monte_carlo():
    rewards, values = _rand(3, 5), _rand(3, 5, seed=1)
    adv, ret = rlhf.gae(rewards, values, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, rlhf.discounted_returns(rewards, 1.0))
    assert torch.allclose(adv, ret - values)


def test_reverse_discount_equals_the_recurrence_it_replaces():
    """The closed form against the loop it stands for, on long sequences and small factors."""
    for g, factor in ((1, 0.9), (7, 0.95), (300, 0.99), (50, 0.0), (64, 1.0)):
        x = _rand(3, g, seed=g)
        y = torch.zeros_like(x)
        run = torch.zeros_like(x[:, 0])
        for t in reversed(range(g)):
            run = x[:, t] + factor * run
            y[:, t] = run
        assert torch.allclose(rlhf.reverse_discount(x, factor), y, rtol=1e-10, atol=1e-12), (g, factor)


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0]], dtype=D)
    assert rlhf.discounted_returns(r, 0.5)[0].tolist() == pytest.approx([1.5, 1.0, 2.0])


def test_clipped_surrogate_clips_in_the_pessimistic_direction():
    old = torch.zeros(1, 4, dtype=D)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=D))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=D)
    out = rlhf.clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0 → clipped 1.2; A<0 → unclipped 1.5; ratio 0.5, A>0 → 0.5; A<0 → clipped 0.8
    assert out[0].tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])


def test_critic_loss_by_hand():
    v = torch.tensor([[1.0, 0.0]], dtype=D)
    old = torch.tensor([[0.0, 0.0]], dtype=D)
    ret = torch.tensor([[2.0, 1.0]], dtype=D)
    # token 0: max((1−2)², (0.2−2)²) = 3.24; token 1: max(1, 1) = 1
    loss = rlhf.critic_loss(v, old, ret, value_clip=0.2, norm=2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_grpo_advantages_are_normalised_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0], dtype=D)
    adv = rlhf.grpo_advantages(r, group_size=3)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    assert adv[3:].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_k3_kl_is_zero_at_equality_and_non_negative():
    a, b = _rand(4, 6), _rand(4, 6, seed=1)
    assert torch.all(rlhf.k3_kl(a, b) >= 0)
    assert torch.allclose(rlhf.k3_kl(a, a), torch.zeros_like(a))


def test_dpo_loss_is_log2_at_the_reference_and_by_hand():
    logp = _rand(4, 3)
    assert rlhf.dpo_loss(logp, logp, beta=0.1, norm=2).item() == pytest.approx(math.log(2))
    ref = torch.zeros(2, 3, dtype=D)
    pol = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    assert rlhf.dpo_loss(pol, ref, beta=0.5, norm=1).item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_reward_model_loss_by_hand():
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=D)
    expect = (math.log1p(math.exp(-1.0)) + math.log(2)) / 2
    assert rlhf.reward_model_loss(scores, norm=2).item() == pytest.approx(expect)


def test_sft_loss_is_mean_negative_logp():
    logp = _rand(2, 3)
    assert rlhf.sft_loss(logp, norm=6).item() == pytest.approx(-logp.mean().item())


def test_remax_returns_without_kl_are_the_reward_margin():
    old, ref = _rand(2, 3), _rand(2, 3, seed=1)
    ret = rlhf.remax_returns(old, ref, torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.5, 0.5], dtype=D),
                             kl_coef=0.0, gamma=1.0)
    assert ret.flatten().tolist() == pytest.approx([0.5] * 3 + [-0.5] * 3)


def _losses(logp: torch.Tensor, rows: slice, norm: int) -> dict[str, torch.Tensor]:
    g = logp.shape[1]
    old, ref = _rand(8, g, seed=2)[rows], _rand(8, g, seed=3)[rows]
    adv, vals = _rand(8, g, seed=4)[rows], _rand(8, g, seed=5)[rows]
    lp = logp[rows]
    return {
        "ppo": rlhf.ppo_actor_loss(lp, old, adv, 0.2, norm * g),
        "critic": rlhf.critic_loss(lp, old, vals, 0.2, norm * g),
        "grpo": rlhf.grpo_loss(lp, old, ref, adv[:, 0], 0.2, 0.05, norm * g),
        "dpo": rlhf.dpo_loss(lp, ref, 0.1, norm // 2),
        "sft": rlhf.sft_loss(lp, norm * g),
        "reinforce": rlhf.reinforce_loss(lp, adv, norm * g),
        "rw": rlhf.reward_model_loss(lp[:, -1], norm // 2),
    }


@pytest.mark.parametrize("loss", ["ppo", "critic", "grpo", "dpo", "sft", "reinforce", "rw"])
def test_micro_batch_losses_sum_to_the_minibatch_loss_and_gradient(loss):
    """The normaliser rule: summing micro-batch losses (each ÷ the global count) gives the
    full-batch loss and gradient for any split into even row blocks."""
    logp = _rand(8, 5, seed=9).requires_grad_(True)
    full = _losses(logp, slice(0, 8), 8)[loss]
    (g_full,) = torch.autograd.grad(full, logp)
    parts = [_losses(logp, slice(lo, lo + 2), 8)[loss] for lo in range(0, 8, 2)]
    total = sum(parts)
    (g_parts,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(g_parts, g_full, atol=1e-14, rtol=0)


def test_right_padded_rows_use_only_their_real_tokens():
    """Rows of drawn length, right-padded: each row's log-probs, values, GAE, returns and losses
    equal those of the row alone, cut to its own prompt and response (the fixed-length code)."""
    torch.manual_seed(0)
    b, cap_p, cap_g, vocab = 3, 5, 6, 11
    prompts, lengths = torch.tensor([5, 2, 4]), torch.tensor([6, 1, 3])
    width = cap_p + cap_g
    logits = torch.randn(b, width, vocab, dtype=torch.float64)
    seq = torch.randint(0, vocab, (b, width))
    values = torch.randn(b, width, dtype=torch.float64)
    old, ref = torch.randn(b, cap_g, dtype=torch.float64), torch.randn(b, cap_g, dtype=torch.float64)
    reward = torch.randn(b, dtype=torch.float64)
    logp = rlhf.response_logp_rows(logits, seq, prompts, cap_g, 0.7)
    v = rlhf.response_values_rows(values, prompts, cap_g)
    mask = rlhf.response_mask(lengths, cap_g)
    adv, ret = rlhf.ppo_advantages(old, ref, reward, torch.where(mask, v, 0.0), 0.1, 0.9, 0.8, lengths)
    score = rlhf.sequence_reward_at(values, prompts + lengths - 1)
    for r in range(b):
        p, n = int(prompts[r]), int(lengths[r])
        one = slice(r, r + 1)
        end = p + n
        want = rlhf.response_logp(logits[one, :end], seq[one, :end], p, 0.7)
        assert torch.allclose(logp[one, :n], want)
        assert torch.allclose(v[one, :n], rlhf.response_values(values[one, :end], p))
        a, g = rlhf.ppo_advantages(old[one, :n], ref[one, :n], reward[one], v[one, :n], 0.1, 0.9, 0.8)
        assert torch.allclose(adv[one, :n], a) and torch.allclose(ret[one, :n], g)
        assert (adv[one, n:] == 0).all()
        assert score[r] == values[r, end - 1]
    # losses sum only the real tokens: garbage past the ends changes nothing
    noisy = torch.where(mask, logp, torch.full_like(logp, 1e6))
    norm = int(lengths.sum())
    assert rlhf.grpo_loss(noisy, old, ref, reward, 0.2, 0.05, norm, mask) == \
        pytest.approx(float(rlhf.grpo_loss(logp, old, ref, reward, 0.2, 0.05, norm, mask)))
    per_row = sum(float(rlhf.grpo_loss(logp[r:r + 1, :int(lengths[r])], old[r:r + 1, :int(lengths[r])],
                                       ref[r:r + 1, :int(lengths[r])], reward[r:r + 1], 0.2, 0.05, norm))
                  for r in range(b))
    assert float(rlhf.grpo_loss(logp, old, ref, reward, 0.2, 0.05, norm, mask)) == pytest.approx(per_row)
    returns = rlhf.remax_returns(old, ref, reward, reward / 2, 0.1, 0.9, lengths)
    assert (returns[mask == 0] == 0).all()
    assert torch.allclose(returns[1, :1], rlhf.remax_returns(old[1:2, :1], ref[1:2, :1], reward[1:2],
                                                             reward[1:2] / 2, 0.1, 0.9)[0])
