"""Learn-then-Test calibration: exact p-values, offline replay equals online inference, and the guarantee holds."""

import math

import pytest
import torch

from depthprune.exits.calibrate import ExitRecords, calibrate, check, collect_records, simulate
from depthprune.exits.criteria import make_criterion
from depthprune.ltt import binomial_cdf, ltt_select, risk_p_value


def test_binomial_cdf_matches_direct_sum():
    for n, k, p in [(10, 3, 0.5), (50, 0, 0.01), (200, 7, 0.05), (30, 29, 0.9)]:
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9)
    assert binomial_cdf(5, 5, 0.3) == 1.0


def test_p_value_uses_hoeffding_for_fractional_losses():
    losses = torch.full((100,), 0.02)
    assert risk_p_value(losses, 0.1) == pytest.approx(math.exp(-2 * 100 * 0.08**2))
    assert risk_p_value(torch.full((100,), 0.2), 0.1) == 1.0


def synthetic(n, generator, exits=3):
    """Exits whose confidence c ~ U(0.5, 1) predicts the final label with probability c: a calibrated toy."""
    final = torch.randint(0, 2, (n,), generator=generator)
    conf = 0.5 + 0.5 * torch.rand(exits, n, generator=generator)
    agree = torch.rand(exits, n, generator=generator) < conf
    pred = torch.where(agree, final, 1 - final)  # [exits, n]
    p_pred = torch.stack([1 - conf, conf], -1)  # probabilities if the prediction were class 1
    probs = torch.where((pred == 1)[..., None], p_pred, p_pred.flip(-1))
    final_logits = torch.nn.functional.one_hot(final, 2).float() * 10
    return ExitRecords(probs.log(), final_logits, tuple(range(exits)), exits + 1, labels=final)


def test_guarantee_holds_over_many_calibration_draws():
    g = torch.Generator().manual_seed(0)
    population = synthetic(200_000, g)
    delta, epsilon, grid = 0.1, 0.1, [1.0, 0.97, 0.95, 0.93, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 0.75, 0.7]
    true_risk = {t: 1 - check(make_criterion("max_prob", t), population)["agreement"] for t in grid}
    # the grid crosses delta, so too aggressive choices exist and the test can fail
    assert min(true_risk.values()) < delta < max(true_risk.values())
    violations, draws = 0, 200
    for _ in range(draws):
        result = calibrate("max_prob", synthetic(300, g), delta=delta, epsilon=epsilon, grid=grid)
        if result.threshold is not None and true_risk[result.threshold] > delta:
            violations += 1
    # Binomial(200, 0.1) exceeds 30 with probability < 1%
    assert violations / draws <= epsilon + 0.05
    most_aggressive_safe = min(t for t in grid if true_risk[t] <= delta)
    assert result.threshold is not None and result.threshold <= most_aggressive_safe + 0.1  # not uselessly conservative


def test_fixed_sequence_stops_at_first_failure():
    risks = {1: 0.0, 2: 0.5, 3: 0.0}
    chosen, table = ltt_select([1, 2, 3], lambda t: torch.full((1000,), risks[t]).bernoulli(), 0.1, 0.05)
    assert chosen == 1 and len(table) == 2


def test_delta_epsilon_validated():
    with pytest.raises(ValueError, match="delta and epsilon"):
        ltt_select([1.0], lambda t: torch.zeros(3), 0.0, 0.1)


def test_guarantee_text_and_no_certificate():
    g = torch.Generator().manual_seed(1)
    ok = calibrate("max_prob", synthetic(2000, g), delta=0.1, epsilon=0.05)
    assert ok.threshold is not None and "probability >= 0.95" in ok.guarantee() and ">= 0.9" in ok.guarantee()
    none = calibrate("max_prob", synthetic(10, g), delta=0.01, epsilon=0.01, grid=[0.6])
    assert none.threshold is None and "no threshold certified" in none.guarantee()


def test_offline_replay_matches_online_inference():
    from test_exit_inference import batch, confident_heads, tiny

    from depthprune.exits.inference import EarlyExitClassifier

    model = tiny("bert")
    heads = confident_heads(model, extras=("halting", "gate", "agreement"))
    ids, mask = batch(16)
    records = collect_records(
        model,
        heads,
        [{"input_ids": ids[:8], "attention_mask": mask[:8]}, {"input_ids": ids[8:], "attention_mask": mask[8:]}],
    )
    for name, t in [
        ("max_prob", 0.9),
        ("patience", 1),
        ("voting", 0.6),
        ("q_exit", 0.5),
        ("gate", 0.5),
        ("learned", 0.5),
        ("static", 2),
    ]:
        crit = make_criterion(name, t)
        pred, layers = simulate(crit, records)
        online = EarlyExitClassifier(model, heads, crit)(ids, mask)
        assert layers.tolist() == online.exit_layer.tolist(), name
        assert pred.tolist() == online.predictions.tolist(), name


def with_noisy_labels(records, generator, wrong=0.2):
    """The same records with labels the full model gets wrong on a `wrong` share of samples."""
    final = records.final.argmax(-1)
    flip = torch.rand(final.shape, generator=generator) < wrong
    return ExitRecords(
        records.logits,
        records.final,
        records.exit_layers,
        records.num_layers,
        labels=torch.where(flip, 1 - final, final),
    )


def test_accuracy_drop_counts_only_samples_the_full_model_gets_right():
    # 4 samples, one exit after layer 0 that always fires (confidence 1): exit predictions 1, 1, 0, 0
    logits = torch.tensor([[[0.0, 50.0], [0.0, 50.0], [50.0, 0.0], [50.0, 0.0]]])
    final = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])  # full model predicts 0, 1, 0, 1
    labels = torch.tensor([0, 1, 1, 0])  # full model right on samples 0 and 1, wrong on 2 and 3
    records = ExitRecords(logits, final, (0,), 2, labels=labels)
    grid = [0.99]
    drop = calibrate("max_prob", records, delta=0.5, epsilon=0.5, grid=grid, risk="accuracy_drop")
    dis = calibrate("max_prob", records, delta=0.5, epsilon=0.5, grid=grid)
    # disagreements: samples 0 and 3 (risk 0.5); accuracy lost: sample 0 only (full right, exit wrong): 0.25
    assert dis.table[0]["risk"] == pytest.approx(0.5)
    assert drop.table[0]["risk"] == pytest.approx(0.25)
    assert drop.risk == "accuracy_drop" and "accuracy drops by at most 50 points" in drop.guarantee()


def test_accuracy_drop_guarantee_holds_and_is_never_more_conservative():
    g = torch.Generator().manual_seed(3)
    population = with_noisy_labels(synthetic(200_000, g), g)
    delta, epsilon, grid = 0.08, 0.1, [1.0, 0.97, 0.95, 0.93, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 0.75, 0.7, 0.6]
    full_right = population.final.argmax(-1) == population.labels
    true_risk = {}
    for t in grid:
        pred, _ = simulate(make_criterion("max_prob", t), population)
        true_risk[t] = float((full_right & (pred != population.labels)).float().mean())
    assert min(true_risk.values()) < delta < max(true_risk.values())
    violations, draws, more_aggressive = 0, 150, 0
    for _ in range(draws):
        sample = with_noisy_labels(synthetic(300, g), g)
        drop = calibrate("max_prob", sample, delta=delta, epsilon=epsilon, grid=grid, risk="accuracy_drop")
        dis = calibrate("max_prob", sample, delta=delta, epsilon=epsilon, grid=grid)
        if drop.threshold is not None and true_risk[drop.threshold] > delta:
            violations += 1
        # its losses are a subset of the disagreements, so it certifies at least as far down the grid
        assert len(drop.table) >= len(dis.table)
        more_aggressive += len(drop.table) > len(dis.table)
    assert violations / draws <= epsilon + 0.05
    assert more_aggressive > 0


def test_risk_errors():
    g = torch.Generator().manual_seed(2)
    records = synthetic(50, g)
    with pytest.raises(ValueError, match="unknown risk 'accuracy'.*disagreement, accuracy_drop"):
        calibrate("max_prob", records, risk="accuracy")
    unlabelled = ExitRecords(records.logits, records.final, records.exit_layers, records.num_layers)
    with pytest.raises(ValueError, match="needs labels on the calibration split"):
        calibrate("max_prob", unlabelled, risk="accuracy_drop")
