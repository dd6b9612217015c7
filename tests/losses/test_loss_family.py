"""Every loss against an independent float64 evaluation of its formula (plain Python math, one pair
at a time), gradchecks, extreme inputs, and the registry table."""

import functools
import math

import pytest
import torch

from dpokit.losses import (
    CombinedLossOutput,
    call_loss,
    combined_loss,
    get_loss,
    is_reference_free,
    loss_names,
    wpo_weights,
)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def inputs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 4 - 30 for _ in range(4))
    lengths = [torch.randint(1, 40, (n,), generator=g) for _ in range(2)]
    gt = [torch.rand(n, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=lengths[0], nr=lengths[1], gc=gt[0], gr=gt[1])


# name -> (kwargs, f(pc, pr, rc, rr, nc, nr, gc, gr) -> (loss, chosen_reward, rejected_reward)),
# written from the papers' formulas without looking at the implementation.
B = 0.3


def _dpo_like(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


PAIR_FORMULAS = {
    "dpo": (
        {"beta": B, "label_smoothing": 0.2},
        lambda pc, pr, rc, rr, *_: (_dpo_like(B * ((pc - rc) - (pr - rr)), 0.2), B * (pc - rc), B * (pr - rr)),
    ),
    "ipo": (
        {"beta": B},
        lambda pc, pr, rc, rr, nc, nr, *_: (
            ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * B)) ** 2,
            B * (pc - rc) / nc,
            B * (pr - rr) / nr,
        ),
    ),
    "rpo_sq": (
        {"beta": B, "gt_reward_scale": 0.7},
        lambda pc, pr, rc, rr, nc, nr, gc, gr: (
            (B * ((pc - rc) - (pr - rr)) - 0.7 * (gc - gr)) ** 2,
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "rpo_fwd_kl": ({"beta": B, "gt_reward_scale": 0.7}, None),  # below
    "rpo_bwd_kl": ({"beta": B, "gt_reward_scale": 0.7}, None),
    "hinge": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (max(0.0, 1 - B * ((pc - rc) - (pr - rr))), B * (pc - rc), B * (pr - rr)),
    ),
    "robust": (
        {"beta": B, "label_smoothing": 0.1},
        lambda pc, pr, rc, rr, *_: (
            (-(0.9) * logsig(B * ((pc - rc) - (pr - rr))) + 0.1 * logsig(-B * ((pc - rc) - (pr - rr)))) / 0.8,
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "exo_pair": ({"beta": B, "label_smoothing": 0.01}, None),
    "nca_pair": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (
            -logsig(B * (pc - rc)) - 0.5 * logsig(-B * (pc - rc)) - 0.5 * logsig(-B * (pr - rr)),
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "bco_pair": (
        {"beta": B, "reward_shift": 0.25},
        lambda pc, pr, rc, rr, *_: (
            -logsig(B * (pc - rc) - 0.25) - logsig(-(B * (pr - rr) - 0.25)),
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "sppo_hard": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (
            (pc - rc - 1 / (2 * B)) ** 2 + (pr - rr + 1 / (2 * B)) ** 2,
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "apo_zero": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (1 - sig(B * (pc - rc)) + sig(B * (pr - rr)), B * (pc - rc), B * (pr - rr)),
    ),
    "apo_down": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (
            sig(B * (pc - rc)) + 1 - sig(B * ((pc - rc) - (pr - rr))),
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "discopop": ({"beta": B, "tau": 0.5}, None),
    "sigmoid_norm": (
        {"beta": B},
        lambda pc, pr, rc, rr, nc, nr, *_: (
            -logsig(B * ((pc - rc) / nc - (pr - rr) / nr)),
            B * (pc - rc) / nc,
            B * (pr - rr) / nr,
        ),
    ),
    "reverse_kl": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (-logsig(B * ((pc - rc) - (pr - rr))), B * (pc - rc), B * (pr - rr)),
    ),
    "forward_kl": (
        {"beta": B},
        lambda pc, pr, rc, rr, *_: (
            -logsig(B * (-math.exp(-(pc - rc)) + math.exp(-(pr - rr)))),
            B * (pc - rc),
            B * (pr - rr),
        ),
    ),
    "js_divergence": ({"beta": B}, None),
    "alpha_divergence": ({"beta": B, "alpha": 0.3}, None),
    "simpo": (
        {"beta": 2.0, "gamma": 0.4},
        lambda pc, pr, rc, rr, nc, nr, *_: (-logsig(2.0 * pc / nc - 2.0 * pr / nr - 0.4), 2.0 * pc / nc, 2.0 * pr / nr),
    ),
    "cpo": (
        {"beta": B, "cpo_alpha": 0.5},
        lambda pc, pr, rc, rr, nc, nr, *_: (-logsig(B * (pc - pr)) - 0.5 * pc / nc, B * pc, B * pr),
    ),
    "orpo": ({"beta": B}, None),
    "sft": ({}, lambda pc, *_: (-pc, 0.0, 0.0)),
}


def _rpo_kl(pc, pr, rc, rr, nc, nr, gc, gr, forward):
    p = sig(B * ((pc - rc) - (pr - rr)))
    q = sig(0.7 * (gc - gr))
    a, b = (p, q) if forward else (q, p)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)), B * (pc - rc), B * (pr - rr)


def _exo(pc, pr, rc, rr, *_):
    z = B * ((pc - rc) - (pr - rr))
    qw, ql = sig(z), sig(-z)
    return qw * (math.log(qw) - math.log(0.99)) + ql * (math.log(ql) - math.log(0.01)), B * (pc - rc), B * (pr - rr)


def _discopop(pc, pr, rc, rr, *_):
    z = B * ((pc - rc) - (pr - rr))
    m = sig(z / 0.5)
    return (1 - m) * -logsig(z) + m * math.exp(-z), B * (pc - rc), B * (pr - rr)


def _js(pc, pr, rc, rr, *_):
    # f'(u) = log(2u / (1 + u)); the constant log 2 cancels in the difference
    s = lambda r: math.log(2 * math.exp(r) / (1 + math.exp(r)))  # noqa: E731
    return -logsig(B * (s(pc - rc) - s(pr - rr))), B * (pc - rc), B * (pr - rr)


def _alpha(pc, pr, rc, rr, *_):
    s = lambda r: (1 - math.exp(r) ** -0.3) / 0.3  # noqa: E731
    return -logsig(B * (s(pc - rc) - s(pr - rr))), B * (pc - rc), B * (pr - rr)


def _orpo(pc, pr, rc, rr, nc, nr, *_):
    aw, al = pc / nc, pr / nr
    odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
    return -aw - B * logsig(math.log(odds(aw) / odds(al))), B * aw, B * al


PAIR_FORMULAS["rpo_fwd_kl"] = (PAIR_FORMULAS["rpo_fwd_kl"][0], functools.partial(_rpo_kl, forward=True))
PAIR_FORMULAS["rpo_bwd_kl"] = (PAIR_FORMULAS["rpo_bwd_kl"][0], functools.partial(_rpo_kl, forward=False))
PAIR_FORMULAS["exo_pair"] = (PAIR_FORMULAS["exo_pair"][0], _exo)
PAIR_FORMULAS["discopop"] = (PAIR_FORMULAS["discopop"][0], _discopop)
PAIR_FORMULAS["js_divergence"] = (PAIR_FORMULAS["js_divergence"][0], _js)
PAIR_FORMULAS["alpha_divergence"] = (PAIR_FORMULAS["alpha_divergence"][0], _alpha)
PAIR_FORMULAS["orpo"] = (PAIR_FORMULAS["orpo"][0], _orpo)


def run(name, kwargs, x, **extra):
    loss_fn = get_loss(name, **kwargs)
    ref = (None, None) if is_reference_free(loss_fn) else (x["rc"], x["rr"])
    return call_loss(
        loss_fn,
        x["pc"],
        x["pr"],
        *ref,
        chosen_lengths=x["nc"],
        rejected_lengths=x["nr"],
        chosen_gt_rewards=x["gc"],
        rejected_gt_rewards=x["gr"],
        **extra,
    )


@pytest.mark.parametrize("name", sorted(PAIR_FORMULAS))
def test_loss_matches_float64_formula(name):
    kwargs, formula = PAIR_FORMULAS[name]
    # ORPO needs mean log-probs well inside (-inf, 0): scale the inputs down for it.
    x = inputs()
    if name == "orpo":
        x = {**x, "pc": x["pc"] / 30, "pr": x["pr"] / 30}
    out = run(name, kwargs, x)
    cols = {k: v.tolist() for k, v in x.items()}
    expected = [formula(*(cols[k][i] for k in ("pc", "pr", "rc", "rr", "nc", "nr", "gc", "gr"))) for i in range(12)]
    for got, column in zip(out[:3], zip(*expected)):
        torch.testing.assert_close(got, torch.tensor(column, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,paired", [("aot", True), ("aot_unpaired", False)])
def test_aot_matches_sorted_formula(name, paired):
    x = inputs()
    out = run(name, {"beta": B, "label_smoothing": 0.1}, x)
    pc, pr, rc, rr = (x[k].tolist() for k in ("pc", "pr", "rc", "rr"))
    if paired:
        u, v = sorted(a - b for a, b in zip(pc, pr)), sorted(a - b for a, b in zip(rc, rr))
    else:
        u, v = sorted(a - b for a, b in zip(pc, rc)), sorted(a - b for a, b in zip(pr, rr))
    expected = [_dpo_like(B * (a - b), 0.1) for a, b in zip(u, v)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_every_registered_name_resolves_and_runs():
    names = loss_names()
    assert {
        "dpo",
        "ipo",
        "rpo_sq",
        "rpo_fwd_kl",
        "rpo_bwd_kl",
        "hinge",
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "reverse_kl",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
        "simpo",
        "cpo",
        "orpo",
        "sft",
        "combined",
    } <= set(names)
    x = inputs(n=6)
    for name in names:
        kwargs = {} if name in ("sft", "simpo", "cpo", "orpo") else {"beta": 0.2}
        x_name = {**x, "pc": x["pc"] / 30, "pr": x["pr"] / 30} if name == "orpo" else x
        out = run(name, kwargs, x_name)
        assert out.losses.shape == (6,) and torch.isfinite(out.losses).all(), name
        assert out.chosen_rewards.shape == (6,) and not out.chosen_rewards.requires_grad, name


def test_reference_free_flags():
    assert all(is_reference_free(get_loss(n)) for n in ("simpo", "cpo", "orpo", "sft"))
    assert not any(is_reference_free(get_loss(n, beta=0.1)) for n in ("dpo", "ipo", "aot", "forward_kl"))
    assert is_reference_free(get_loss("combined", preference_loss=["simpo", "sft"], preference_loss_weight=[1, 1]))
    assert not is_reference_free(get_loss("combined", preference_loss="dpo", beta=0.1))
    assert not is_reference_free(lambda *a: None)  # a user's own loss: assume it needs the reference


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'simpo'"):
        get_loss("simpoo")


@pytest.mark.parametrize("name", sorted(set(PAIR_FORMULAS) | {"aot", "aot_unpaired", "combined"}))
def test_gradcheck(name):
    kwargs = PAIR_FORMULAS.get(name, ({"beta": B},))[0]
    x = inputs(n=4, seed=1)
    scale = 1 / 30 if name == "orpo" else 1
    tensors = [(x[k] * (scale if k in ("pc", "pr") else 1)).clone().requires_grad_() for k in ("pc", "pr", "rc", "rr")]

    def f(pc, pr, rc, rr):
        return run(name, kwargs, {**x, "pc": pc, "pr": pr, "rc": rc, "rr": rr}).losses

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("name", sorted(set(PAIR_FORMULAS) | {"aot", "aot_unpaired", "combined"}))
def test_extreme_gaps_stay_finite(name):
    kwargs = PAIR_FORMULAS.get(name, ({"beta": B},))[0]
    big = torch.tensor([0.0, -1e4, -1e4, -0.5], dtype=torch.float32)
    small = torch.tensor([-1e4, 0.0, -1e4, -1e4], dtype=torch.float32)
    x = {
        "pc": big - 1e-3,
        "pr": small - 1e-3,
        "rc": torch.zeros(4),
        "rr": torch.zeros(4),
        "nc": torch.tensor([1, 3, 7, 1]),
        "nr": torch.tensor([5, 1, 2, 1]),
        "gc": torch.tensor([1e4, 0.0, 1.0, -1e4]),
        "gr": torch.zeros(4),
    }
    pc, pr = x["pc"].requires_grad_(), x["pr"].requires_grad_()
    out = run(name, kwargs, x)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert all(t.grad is None or torch.isfinite(t.grad).all() for t in (pc, pr))
    assert pc.grad is not None


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "cpo", "orpo"])
def test_empty_response_is_a_clear_error(name):
    x = inputs(n=3)
    x["nc"] = torch.tensor([4, 0, 2])
    with pytest.raises(ValueError, match=r"pair\(s\) \[1\] have an empty response"):
        run(name, {"beta": 0.1}, x)


@pytest.mark.parametrize("name", ["ipo", "simpo"])
def test_missing_lengths_is_a_clear_error(name):
    x = inputs(n=3)
    with pytest.raises(ValueError, match="token counts"):
        get_loss(name, beta=0.1)(x["pc"], x["pr"], x["rc"], x["rr"])


def test_ipo_summed_option_is_nemo_aligner_form():
    x = inputs()
    out = run("ipo", {"beta": B, "average_logps": False}, x)
    h = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
    torch.testing.assert_close(out.losses, (h - 1 / (2 * B)) ** 2)


def test_rpo_bwd_kl_with_hard_labels_is_dpo():
    x = inputs()
    one, zero = torch.full((12,), 1e3, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    rpo = run("rpo_bwd_kl", {"beta": B}, {**x, "gc": one, "gr": zero})
    dpo = run("dpo", {"beta": B}, x)
    torch.testing.assert_close(rpo.losses, dpo.losses)


def test_rpo_ground_truth_defaults_are_one_and_zero():
    x = inputs()
    loss_fn = get_loss("rpo_sq", beta=B)
    got = loss_fn(x["pc"], x["pr"], x["rc"], x["rr"]).losses
    want = (B * ((x["pc"] - x["rc"]) - (x["pr"] - x["rr"])) - 1.0) ** 2
    torch.testing.assert_close(got, want)


def test_alpha_divergence_limits():
    """alpha -> 0 is reverse KL (DPO), alpha -> 1 is forward KL."""
    x = inputs()
    torch.testing.assert_close(
        run("alpha_divergence", {"beta": B, "alpha": 1e-7}, x).losses,
        run("dpo", {"beta": B}, x).losses,
        rtol=1e-5,
        atol=1e-6,
    )
    # forward KL's score is -1/u; alpha = 1 gives 1 - 1/u: same margins.
    torch.testing.assert_close(
        run("alpha_divergence", {"beta": B, "alpha": 1 - 1e-9}, {**x, "pc": x["pc"] / 10, "pr": x["pr"] / 10}).losses,
        run("forward_kl", {"beta": B}, {**x, "pc": x["pc"] / 10, "pr": x["pr"] / 10}).losses,
        rtol=1e-6,
        atol=1e-6,
    )


class TestCombined:
    def test_nemo_objective_preference_plus_sft(self):
        x = inputs()
        out = run(
            "combined", {"preference_loss": "ipo", "beta": B, "preference_loss_weight": 0.5, "sft_loss_weight": 0.2}, x
        )
        ipo = run("ipo", {"beta": B}, x)
        assert isinstance(out, CombinedLossOutput)
        torch.testing.assert_close(out.preference_losses, 0.5 * ipo.losses)
        torch.testing.assert_close(out.sft_losses, -x["pc"])
        torch.testing.assert_close(out.losses, 0.5 * ipo.losses + 0.2 * -x["pc"])
        torch.testing.assert_close(out.chosen_rewards, ipo.chosen_rewards)

    def test_average_switches_divide_by_token_counts(self):
        x = inputs()
        out = run(
            "combined",
            {"preference_loss": "dpo", "beta": B, "preference_average_logps": True, "sft_loss_weight": 1.0},
            x,
        )
        avg = {**x, **{k: x[k] / x[n] for k, n in (("pc", "nc"), ("rc", "nc"), ("pr", "nr"), ("rr", "nr"))}}
        torch.testing.assert_close(out.preference_losses, run("dpo", {"beta": B}, avg).losses)
        torch.testing.assert_close(out.sft_losses, -x["pc"] / x["nc"])  # sft follows the switch by default
        summed = run(
            "combined",
            {
                "preference_loss": "dpo",
                "beta": B,
                "preference_average_logps": True,
                "sft_average_logps": False,
                "sft_loss_weight": 1.0,
            },
            x,
        )
        torch.testing.assert_close(summed.sft_losses, -x["pc"])

    def test_length_normalising_term_does_not_divide_twice(self):
        x = inputs()
        out = run("combined", {"preference_loss": "sigmoid_norm", "beta": B, "preference_average_logps": True}, x)
        torch.testing.assert_close(out.losses, run("sigmoid_norm", {"beta": B}, x).losses)

    def test_mpo_weighted_sum_and_wpo_weighting(self):
        x = inputs()
        x = {**x, "pc": x["pc"] / 30, "pr": x["pr"] / 30}
        terms = ["dpo", "bco_pair", "sft"]
        out = run(
            "combined",
            {"preference_loss": terms, "preference_loss_weight": [0.8, 0.2, 1.0], "beta": B, "wpo_weighting": True},
            x,
        )
        w = torch.exp(x["pc"] / x["nc"] + x["pr"] / x["nr"])
        want = w * (
            0.8 * run("dpo", {"beta": B}, x).losses + 0.2 * run("bco_pair", {"beta": B}, x).losses - 1.0 * x["pc"]
        )
        torch.testing.assert_close(out.losses, want)
        torch.testing.assert_close(wpo_weights(x["pc"], x["pr"], x["nc"], x["nr"]), w)

    def test_terms_may_be_callables(self):
        x = inputs()
        out = combined_loss(
            x["pc"],
            x["pr"],
            x["rc"],
            x["rr"],
            preference_loss=[get_loss("hinge", beta=0.5)],
            preference_loss_weight=[2.0],
        )
        torch.testing.assert_close(out.losses, 2 * run("hinge", {"beta": 0.5}, x).losses)

    def test_argument_no_term_takes_is_an_error(self):
        x = inputs()
        with pytest.raises(ValueError, match=r"no preference loss takes the argument\(s\) \['btea'\]"):
            combined_loss(x["pc"], x["pr"], x["rc"], x["rr"], preference_loss="dpo", beta=0.1, btea=0.2)

    def test_weight_count_must_match(self):
        x = inputs()
        with pytest.raises(ValueError, match="2 preference loss"):
            combined_loss(x["pc"], x["pr"], x["rc"], x["rr"], preference_loss=["dpo", "ipo"], beta=0.1)
