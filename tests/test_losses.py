"""Tests for treg/method/losses.py: hand-derived values, gradients, stop-gradient, TRL oracles, errors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from treg.method.losses import PREFERENCE_LOSSES, PairwiseLoss, treg_loss

NAN = float("nan")
T, F = True, False


def _dpo_pair():
    """B=1 pair used by the hand-derived DPO tests (masked-out values are NaN on purpose)."""
    return dict(
        chosen_logps=torch.tensor([[-1.0, -2.0]]), rejected_logps=torch.tensor([[-3.0, NAN, -1.0]]),
        chosen_mask=torch.tensor([[T, T]]), rejected_mask=torch.tensor([[T, F, T]]),
        chosen_token_rewards=torch.tensor([[0.25, -0.5]]), rejected_token_rewards=torch.tensor([[0.1, NAN, -0.2]]),
        ref_chosen_logps=torch.tensor([-4.0]), ref_rejected_logps=torch.tensor([-3.0]))


def test_dpo_alpha0_hand_values_two_pairs():
    """beta=0.5. Pair 1: logp_w=-1-2=-3, ref_w=-4 -> ratio_w=1; logp_l=-3-1=-4, ref_l=-3 -> ratio_l=-1;
    z=0.5*(1-(-1))=1 -> L1=log(1+e^-1)=0.313261687518. Pair 2: ratio_w=-1-(-1)=0, ratio_l=-3-(-3)=0
    -> z=0 -> L2=log 2=0.693147180560. loss=(L1+L2)/2=0.503204434039.
    rewards/chosen=mean(0.5*1, 0)=0.25, rewards/rejected=mean(-0.5, 0)=-0.25, accuracies=mean(1,0)=0.5,
    margins=0.5, logps/chosen=mean(-3,-1)=-2, logps/rejected=mean(-4,-3)=-3.5, seq_weight=mean(s(-1), 0.5)."""
    out = treg_loss(torch.tensor([[-1.0, -2.0], [-0.5, -0.5]]), torch.tensor([[-3.0, NAN, -1.0], [-1.0, -1.0, -1.0]]),
                    torch.tensor([[T, T], [T, T]]), torch.tensor([[T, F, T], [T, T, T]]),
                    ref_chosen_logps=torch.tensor([-4.0, -1.0]), ref_rejected_logps=torch.tensor([-3.0, -3.0]),
                    method="dpo", beta=0.5)
    assert out.loss.item() == pytest.approx(0.503204434039, abs=1e-6)
    assert out.per_example.tolist() == pytest.approx([0.313261687518, 0.693147180560], abs=1e-6)
    m = out.metrics
    assert m["rewards/chosen"] == pytest.approx(0.25, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(-0.25, abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(0.5, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.5, abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-2.0, abs=1e-6)
    assert m["logps/rejected"] == pytest.approx(-3.5, abs=1e-6)
    assert m["treg/seq_weight"] == pytest.approx((0.268941421370 + 0.5) / 2, abs=1e-6)
    assert m["treg/reg_loss"] == 0.0 and "treg/token_reward_mean_chosen" not in m
    assert m["treg/pref_loss"] == pytest.approx(out.loss.item(), abs=1e-7)  # alpha = 0: the whole loss


@pytest.mark.parametrize("weighting, expected", [
    # 0.313261687518 + 0.5 * sigmoid(-1) * (-0.325) = 0.313261687518 - 0.5*0.268941421370*0.325
    ("sequence", 0.313261687518 - 0.5 * 0.268941421370 * 0.325),
    # static: w = 1 -> 0.313261687518 - 0.5 * 0.325
    ("static", 0.313261687518 - 0.5 * 0.325),
])
def test_dpo_reg_hand_values(weighting, expected):
    """beta=0.5, alpha=0.5, z=1 (see above). L_REG(y_w) = -0.5*(0.25*-1 + -0.5*-2) = -0.5*0.75 = -0.375;
    L_REG(y_l) = -0.5*(0.1*-3 + -0.2*-1) = -0.5*(-0.1) = 0.05 (the NaN is masked out); sum = -0.325.
    token_reward_mean_chosen = (0.25-0.5)/2 = -0.125; rejected = (0.1-0.2)/2 = -0.05."""
    out = treg_loss(**_dpo_pair(), method="dpo", beta=0.5, alpha=0.5, weighting=weighting)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.reg_loss.tolist() == pytest.approx([-0.325], abs=1e-6)
    assert out.metrics["treg/reg_loss"] == pytest.approx(-0.325, abs=1e-6)
    assert out.metrics["treg/pref_loss"] == pytest.approx(0.313261687518, abs=1e-6)  # -log sigmoid(1), no reg
    assert out.metrics["treg/token_reward_mean_chosen"] == pytest.approx(-0.125, abs=1e-6)
    assert out.metrics["treg/token_reward_mean_rejected"] == pytest.approx(-0.05, abs=1e-6)
    assert out.metrics["treg/seq_weight"] == pytest.approx(0.268941421370 if weighting == "sequence" else 1.0, abs=1e-6)


@pytest.mark.parametrize("alpha, weighting, expected", [
    (0.0, "sequence", 0.474076984180),                                  # log(1+e^-0.5)
    (0.25, "sequence", 0.474076984180 - 0.25 * 0.377540668798 * 0.65),  # + 0.25*sigmoid(-0.5)*(-0.65)
    (0.25, "static", 0.474076984180 - 0.25 * 0.65),                     # + 0.25*1*(-0.65)
])
def test_simpo_hand_values(alpha, weighting, expected):
    """beta=2, gamma=0.5. r_w = (2/2)*(-1-2) = -3; r_l = (2/2)*(-3-1) = -4 (NaN masked); z = -3+4-0.5 = 0.5;
    L_SimPO = log(1+e^-0.5) = 0.474076984180; w = sigmoid(-0.5) = 0.377540668798.
    L_REG(y_w) = -(2/2)*(0.25*-1 + -0.5*-2) = -0.75; L_REG(y_l) = -(2/2)*(0.1*-3 + -0.2*-1) = 0.1; sum -0.65.
    rewards/chosen = beta*mean logp = -3 (TRL CPO convention)."""
    args = _dpo_pair()
    del args["ref_chosen_logps"], args["ref_rejected_logps"]
    out = treg_loss(**args, method="simpo", beta=2.0, gamma=0.5, alpha=alpha, weighting=weighting)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_seq_rewards.tolist() == pytest.approx([-3.0], abs=1e-6)
    assert out.rejected_seq_rewards.tolist() == pytest.approx([-4.0], abs=1e-6)


def test_dpo_sft_ablation_by_data():
    """DPO-SFT (METHOD.md §5): r_hat=+0.5 on chosen, 0 on rejected, static w. beta=0.5, alpha=0.5, z=1:
    L_REG(y_w) = -0.5*0.5*(-1-2) = 0.75, L_REG(y_l) = 0 -> loss = 0.313261687518 + 0.5*0.75 = 0.688261687518."""
    args = _dpo_pair()
    args["chosen_token_rewards"] = torch.full((1, 2), 0.5)
    args["rejected_token_rewards"] = torch.zeros(1, 3)
    out = treg_loss(**args, beta=0.5, alpha=0.5, weighting="static")
    assert out.loss.item() == pytest.approx(0.688261687518, abs=1e-6)


def _random_batch(seed=0, B=3, Tw=5, Tl=4):
    g = torch.Generator().manual_seed(seed)
    cm = torch.rand(B, Tw, generator=g) > 0.3
    rm = torch.rand(B, Tl, generator=g) > 0.3
    cm[:, 0] = rm[:, 0] = True
    return dict(
        chosen_logps=-torch.rand(B, Tw, generator=g) * 3, rejected_logps=-torch.rand(B, Tl, generator=g) * 3,
        chosen_mask=cm, rejected_mask=rm,
        chosen_token_rewards=torch.rand(B, Tw, generator=g) - 0.5, rejected_token_rewards=torch.rand(B, Tl, generator=g) - 0.5,
        ref_chosen_logps=-torch.rand(B, generator=g) * 6, ref_rejected_logps=-torch.rand(B, generator=g) * 6)


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_gradient_matches_closed_form(method):
    """d loss / d logp_t = (1/B) * [ -/+ c*sigmoid(-z) - alpha*w*c*r_hat_t ] on response tokens, 0 elsewhere;
    c = beta (dpo) or beta/|y| (simpo), sign - for chosen and + for rejected."""
    beta, alpha, gamma = 0.3, 0.4, (0.2 if method == "simpo" else 0.0)
    b = _random_batch()
    lw = b["chosen_logps"].clone().requires_grad_()
    ll = b["rejected_logps"].clone().requires_grad_()
    out = treg_loss(lw, ll, b["chosen_mask"], b["rejected_mask"], b["chosen_token_rewards"], b["rejected_token_rewards"],
                    b["ref_chosen_logps"], b["ref_rejected_logps"], method=method, beta=beta, alpha=alpha,
                    gamma=gamma)
    out.loss.backward()
    B = lw.shape[0]
    cm, rm = b["chosen_mask"], b["rejected_mask"]
    c_w = beta / cm.sum(1, keepdim=True) if method == "simpo" else torch.full((B, 1), beta)
    c_l = beta / rm.sum(1, keepdim=True) if method == "simpo" else torch.full((B, 1), beta)
    s = out.seq_weight[:, None]  # sigmoid(-z), checked against z below
    z = (out.chosen_seq_rewards - out.rejected_seq_rewards - gamma)
    assert torch.allclose(out.seq_weight, torch.sigmoid(-z), atol=1e-6)
    exp_w = torch.where(cm, (-c_w * s - alpha * s * c_w * b["chosen_token_rewards"]) / B, 0.0)
    exp_l = torch.where(rm, (c_l * s - alpha * s * c_l * b["rejected_token_rewards"]) / B, 0.0)
    assert torch.allclose(lw.grad, exp_w, atol=1e-6)
    assert torch.allclose(ll.grad, exp_l, atol=1e-6)


def test_seq_weight_carries_no_gradient():
    """grad(loss) == grad(L_pref + alpha*w.detach()*L_REG) and != grad with an undetached w."""
    beta, alpha = 0.5, 0.5
    b = _random_batch(seed=1)
    cm, rm = b["chosen_mask"], b["rejected_mask"]

    def manual(lw, ll, detach):
        z = beta * ((torch.where(cm, lw, 0).sum(1) - b["ref_chosen_logps"])
                    - (torch.where(rm, ll, 0).sum(1) - b["ref_rejected_logps"]))
        w = torch.sigmoid(-z)
        w = w.detach() if detach else w
        reg = (-beta * torch.where(cm, b["chosen_token_rewards"] * lw, 0).sum(1)
               - beta * torch.where(rm, b["rejected_token_rewards"] * ll, 0).sum(1))
        return (-torch.nn.functional.logsigmoid(z) + alpha * w * reg).mean()

    grads = {}
    for name in ("treg", "detached", "undetached"):
        lw = b["chosen_logps"].clone().requires_grad_()
        ll = b["rejected_logps"].clone().requires_grad_()
        if name == "treg":
            loss = treg_loss(lw, ll, cm, rm, b["chosen_token_rewards"], b["rejected_token_rewards"], b["ref_chosen_logps"],
                             b["ref_rejected_logps"], beta=beta, alpha=alpha).loss
        else:
            loss = manual(lw, ll, detach=name == "detached")
        loss.backward()
        grads[name] = torch.cat([lw.grad.flatten(), ll.grad.flatten()])
    assert torch.allclose(grads["treg"], grads["detached"], atol=1e-6)
    assert not torch.allclose(grads["treg"], grads["undetached"], atol=1e-4)


def test_credit_agreement():
    """chosen: logp-ref = [+1, -1], r_hat = [0.25, -0.5] -> 2 agree; rejected: logp-ref = [-1, ., +1],
    r_hat = [0.1, ., 0] -> token 1 disagrees, token 3 excluded (r_hat == 0). Share = 2/3."""
    args = _dpo_pair()
    args["rejected_token_rewards"] = torch.tensor([[0.1, NAN, 0.0]])
    out = treg_loss(**args, alpha=0.1, ref_chosen_token_logps=torch.tensor([[-2.0, -1.0]]),
                    ref_rejected_token_logps=torch.tensor([[-2.0, NAN, -2.0]]))
    assert out.metrics["treg/credit_agreement"] == pytest.approx(2 / 3, abs=1e-6)
    assert "treg/credit_agreement" not in treg_loss(**_dpo_pair(), alpha=0.1).metrics


def test_bf16_inputs_are_upcast_and_registry_extension():
    b = _random_batch(seed=2)
    ref = treg_loss(**b, alpha=0.3)
    half = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in b.items()}
    out = treg_loss(**half, alpha=0.3)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=0.05)
    # A new -log sigmoid(z) loss is one registry entry (docs/losses.md): length-normalised DPO.
    dpo = PREFERENCE_LOSSES["dpo"]
    PREFERENCE_LOSSES["dpo_norm_test"] = PairwiseLoss(doc="test", token_scale=lambda n, beta: beta / n, needs_ref=True,
                                                      link=dpo.link, link_weight=dpo.link_weight)
    try:
        out = treg_loss(**b, method="dpo_norm_test", beta=1.0)
        n_w, n_l = b["chosen_mask"].sum(1), b["rejected_mask"].sum(1)
        z = ((torch.where(b["chosen_mask"], b["chosen_logps"], 0).sum(1) - b["ref_chosen_logps"]) / n_w
             - (torch.where(b["rejected_mask"], b["rejected_logps"], 0).sum(1) - b["ref_rejected_logps"]) / n_l)
        assert torch.allclose(out.per_example, -torch.nn.functional.logsigmoid(z), atol=1e-6)
    finally:
        del PREFERENCE_LOSSES["dpo_norm_test"]


# ---------------------------------------------------------------- TRL 1.16 oracles (the real TRL code)
TRL_DPO_TRAINER_LOSSES = [name for name, spec in PREFERENCE_LOSSES.items() if spec.trl_loss_type in
                          ("sigmoid", "ipo", "hinge")]


@pytest.mark.parametrize("method", TRL_DPO_TRAINER_LOSSES)
def test_equals_trl_dpo_trainer_loss(method):
    """Every registry entry backed by TRL's DPOTrainer (sigmoid = DPO, ipo, hinge) equals TRL 1.16's loss."""
    from trl.trainer.dpo_trainer import DPOTrainer
    B, L, beta = 3, 7, 0.2
    g = torch.Generator().manual_seed(3)
    completion_mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i, start in enumerate([2, 3, 1, 4, 2, 3]):
        completion_mask[i, start:L - (i % 3)] = 1
    shift_mask = completion_mask[:, 1:].bool()
    token_logps = -torch.rand(2 * B, L - 1, generator=g) * 4
    ref = -torch.rand(2 * B, generator=g) * 20
    outputs = SimpleNamespace(log_probs=token_logps * shift_mask, entropy=torch.zeros(2 * B, L - 1),
                              mean_logits=torch.zeros(2 * B, L - 1), is_top1=torch.zeros(2 * B, L - 1, dtype=torch.bool))
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                           loss_types=[PREFERENCE_LOSSES[method].trl_loss_type], loss_weights=[1.0], beta=beta,
                           use_weighting=False, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
    garbage = torch.where(shift_mask, token_logps, torch.full_like(token_logps, NAN))
    out = treg_loss(garbage[:B], garbage[B:], shift_mask[:B], shift_mask[B:],
                    ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:], method=method, beta=beta)
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    if method == "dpo":  # TRL logs DPO's implicit rewards; IPO/hinge log the same beta*(logp-ref) sums
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            assert out.metrics[key] == pytest.approx(stub._metrics["train"][key][0], abs=1e-5), key


@pytest.mark.parametrize("method", sorted(PREFERENCE_LOSSES))
def test_sequence_weight_is_minus_link_derivative(method):
    """The 'sequence' weighting is -d link/dz (METHOD.md §4), clipped at 0, for every registry entry."""
    spec, beta = PREFERENCE_LOSSES[method], 0.7
    z = torch.linspace(-3, 3, 25, dtype=torch.float64).requires_grad_()
    spec.link(z, beta).sum().backward()
    assert torch.allclose(spec.link_weight(z.detach(), beta), torch.clamp(-z.grad, min=0), atol=1e-9)


def test_ipo_hand_value():
    """IPO: one pair, |y_w| = 2, |y_l| = 3, beta = 0.5; h = mean(logp_w - ref_w) - mean(logp_l - ref_l)
    = (-3 + 4)/2 - (-3 + 3)/3 = 0.5; loss = (h - 1/(2 beta))^2 = (0.5 - 1)^2 = 0.25."""
    out = treg_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool),
                    torch.ones(1, 3, dtype=torch.bool), ref_chosen_logps=torch.tensor([-4.0]),
                    ref_rejected_logps=torch.tensor([-3.0]), method="ipo", beta=0.5)
    assert out.loss.item() == pytest.approx(0.25, abs=1e-6)
    assert out.chosen_seq_rewards.item() == pytest.approx(0.25, abs=1e-6)  # beta/|y| * (logp - ref)
    assert out.seq_weight.item() == pytest.approx((1 - 2 * 0.25) / 0.25, abs=1e-6)  # z = beta*h = 0.25


def test_simpo_equals_trl_cpo_simpo_loss():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    B, L, V, beta, gamma = 4, 6, 11, 2.5, 1.4
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2 * B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (2 * B, L), generator=g)
    for i, start in enumerate([1, 2, 3, 1, 4, 2, 2, 3]):
        labels[i, :start] = -100
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)  # TRL's (2B,) mean log-probs
    stub = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), loss_type="simpo",
                           simpo_gamma=gamma, beta=beta, label_smoothing=0.0)
    trl_losses, trl_cw, trl_rw = CPOTrainer.cpo_loss(stub, avg[:B], avg[B:])
    trl_loss = trl_losses.mean()  # get_batch_loss_metrics with cpo_alpha = 0 adds no NLL term
    mask = labels[:, 1:] != -100
    tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    out = treg_loss(tok[:B], tok[B:], mask[:B], mask[B:], method="simpo", beta=beta, gamma=gamma)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert torch.allclose(out.per_example, trl_losses, atol=1e-6)
    assert torch.allclose(out.chosen_seq_rewards, trl_cw, atol=1e-5)
    assert torch.allclose(out.rejected_seq_rewards, trl_rw, atol=1e-5)


# ---------------------------------------------------------------- errors
def _err_cases():
    def drop(key):
        return lambda a: a.pop(key)

    def put(key, value):
        return lambda a: a.__setitem__(key, value)

    def nan_at(key, idx):
        return lambda a: a[key].__setitem__(idx, NAN)

    return [
        ({"method": "orpo"}, None, "method"),
        ({"weighting": "linear"}, None, "weighting"),
        ({"beta": 0.0}, None, "beta"),
        ({"alpha": -1.0}, None, "alpha"),
        ({"gamma": 0.5}, None, "gamma"),
        ({}, drop("ref_chosen_logps"), "ref_chosen_logps"),
        ({}, put("ref_rejected_logps", torch.zeros(1, 1)), "ref_rejected_logps"),
        ({}, nan_at("ref_chosen_logps", 0), "ref_chosen_logps"),
        ({"alpha": 0.5}, drop("rejected_token_rewards"), "rejected_token_rewards"),
        ({}, put("chosen_token_rewards", torch.zeros(1, 3)), "chosen_token_rewards"),
        ({}, put("chosen_logps", torch.zeros(1, 3)), "chosen_logps"),
        ({}, put("rejected_mask", torch.ones(2, 3, dtype=torch.bool)), "rejected_mask"),
        ({}, put("chosen_mask", torch.tensor([[F, F]])), "chosen_mask"),
        ({}, put("chosen_mask", torch.tensor([[0.5, 1.0]])), "chosen_mask"),
        ({}, nan_at("chosen_logps", (0, 1)), "chosen_logps"),
        ({}, put("rejected_logps", torch.tensor([[-1.0, NAN, float("inf")]])), "rejected_logps"),
        ({}, nan_at("chosen_token_rewards", (0, 0)), "chosen_token_rewards"),
        ({"ref_chosen_token_logps": torch.zeros(1, 5), "ref_rejected_token_logps": torch.zeros(1, 3)}, None,
         "ref_chosen_token_logps"),
    ]


@pytest.mark.parametrize("kwargs, mutate, name", _err_cases())
def test_errors_name_the_argument(kwargs, mutate, name):
    args = _dpo_pair()
    if mutate is not None:
        mutate(args)
    with pytest.raises(ValueError, match=name):
        treg_loss(**args, **kwargs)


def test_int_mask_accepted_and_masked_garbage_ignored():
    args = _dpo_pair()
    args["rejected_mask"] = torch.tensor([[1, 0, 1]])
    args["rejected_logps"] = torch.tensor([[-3.0, float("inf"), -1.0]])
    assert treg_loss(**args, beta=0.5).loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
