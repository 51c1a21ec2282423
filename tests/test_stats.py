"""The sweep's statistics against numbers worked out by hand."""
import math

import pytest

from excite.experiments import stats


def run(name, seed, best, final=None, finished=True, **values):
    return {"run": name, "seed": seed, "values": values, "finished": finished, "best_val_acc": best,
            "final_val_acc": best if final is None else final, "epochs": 2, "epochs_done": 2 if finished else 1}


def test_mean_and_sample_std_by_hand():
    spread = stats.mean_std([0.5, 0.7, 0.9])
    # mean 0.7; squared deviations 0.04 + 0 + 0.04 over n-1 = 2 degrees of freedom: variance 0.04, sd 0.2
    assert spread.n == 3 and spread.mean == pytest.approx(0.7) and spread.std == pytest.approx(0.2)
    assert stats.mean_std([0.6]) == stats.Spread(0.6, None, 1)
    assert stats.mean_std([]) == stats.Spread(None, None, 0)


def test_paired_interval_by_hand():
    interval = stats.paired_interval([1, 2, 3])
    # mean 2, sd 1, standard error 1/sqrt(3); t(0.975, 2 degrees of freedom) = 4.302653
    half = 4.302653 * 1 / math.sqrt(3)
    assert half == pytest.approx(2.484, abs=1e-3)
    assert interval.n == 3 and interval.mean == pytest.approx(2) and interval.std == pytest.approx(1)
    assert interval.low == pytest.approx(2 - half, abs=1e-5) and interval.high == pytest.approx(2 + half, abs=1e-5)
    # With 2 differences the t quantile is 12.706: a wide interval, but an interval.
    two = stats.paired_interval([1, 3])
    assert two.high - two.mean == pytest.approx(12.7062, abs=1e-3)  # sd sqrt(2) over sqrt(2): one standard error


def test_no_interval_from_fewer_than_two_seeds():
    assert stats.paired_interval([0.01]) == stats.Interval(0.01, None, None, None, 1)
    assert stats.paired_interval([]).n == 0


def seeds_of(model, accuracies, **values):
    return [run(f"{model}-seed{seed}", seed, acc, model=model, **values) for seed, acc in enumerate(accuracies)]


def test_a_paired_difference_that_beats_seed_noise():
    # The seeds move both models together (0.60, 0.70, 0.65); SE is 2, 2.5 and 3 points above at each seed.
    runs = seeds_of("resnet20_cifar", [0.60, 0.70, 0.65]) + seeds_of("se_resnet20_cifar", [0.62, 0.725, 0.68])
    (comparison,) = stats.comparisons(runs, [("model", ["resnet20_cifar", "se_resnet20_cifar"])])
    # differences 2, 2.5, 3 points: mean 2.5, sd 0.5, half width 4.302653 * 0.5 / sqrt(3) = 1.242
    assert comparison["seeds"] == [0, 1, 2]
    assert comparison["mean"] == pytest.approx(0.025)
    assert comparison["low"] == pytest.approx(0.025 - 0.01242, abs=1e-5)
    assert comparison["sentence"] == ("se_resnet20_cifar vs resnet20_cifar: +2.5 points (95% CI +1.3 to +3.7, "
                                      "3 seeds): se_resnet20_cifar is better")
    # Unpaired, the seeds' spread (sd 5 points per model) would swamp the same 2.5 points.
    assert stats.mean_std([0.60, 0.70, 0.65]).std == pytest.approx(0.05)


def test_no_difference_and_the_order_given():
    runs = seeds_of("resnet20_cifar", [0.60, 0.70, 0.65]) + seeds_of("se_resnet20_cifar", [0.61, 0.72, 0.68])
    # Given SE first, the comparison reads plain vs SE: the later value minus the earlier.
    (comparison,) = stats.comparisons(runs, [("model", ["se_resnet20_cifar", "resnet20_cifar"])])
    # differences -1, -2, -3 points: mean -2, sd 1, half width 2.484
    assert comparison["sentence"] == ("resnet20_cifar vs se_resnet20_cifar: -2.0 points (95% CI -4.5 to +0.5, "
                                      "3 seeds): the data do not show a difference")
    runs = seeds_of("resnet20_cifar", [0.70, 0.80, 0.75]) + seeds_of("se_resnet20_cifar", [0.60, 0.71, 0.64])
    (comparison,) = stats.comparisons(runs, [("model", ["resnet20_cifar", "se_resnet20_cifar"])])
    assert comparison["sentence"].endswith(": resnet20_cifar is better")


def test_only_common_seeds_are_paired():
    runs = (seeds_of("resnet20_cifar", [0.60, 0.70, 0.65])
            + [run("se-seed2", 2, 0.70, model="se_resnet20_cifar"), run("se-seed5", 5, 0.9, model="se_resnet20_cifar")])
    (comparison,) = stats.comparisons(runs, [("model", ["resnet20_cifar", "se_resnet20_cifar"])])
    assert comparison["seeds"] == [2] and comparison["mean"] == pytest.approx(0.05)
    assert comparison["low"] is None
    assert comparison["sentence"] == ("se_resnet20_cifar vs resnet20_cifar: +5.0 points (1 seed): no interval can be "
                                      "given with fewer than 2 common seeds")


def test_pairs_differ_in_exactly_one_option():
    axes = [("model", ["densenet121", "se_densenet121"]), ("growth_rate", [12, 24])]
    runs = []
    for model in ("densenet121", "se_densenet121"):
        for k in (12, 24):
            runs += [run(f"{model}-{k}-{s}", s, 0.5 + s / 100 + (k == 24) * 0.02, model=model, growth_rate=k)
                     for s in range(3)]
    found = stats.comparisons(runs, axes)
    # 2 model pairs (one per growth rate) and 2 growth-rate pairs (one per model); the diagonals differ in both.
    assert [(c["a"], c["b"], c["context"]) for c in found] == [
        ("se_densenet121", "densenet121", "growth_rate=12"), ("se_densenet121", "densenet121", "growth_rate=24"),
        ("growth_rate=24", "growth_rate=12", "densenet121"), ("growth_rate=24", "growth_rate=12", "se_densenet121")]
    assert found[2]["mean"] == pytest.approx(0.02) and found[2]["std"] == pytest.approx(0)
    assert found[2]["sentence"].startswith("growth_rate=24 vs growth_rate=12 (densenet121): +2.0 points")
    assert found[0]["mean"] == pytest.approx(0)


def test_variants_aggregate_finished_runs_by_hand():
    runs = [run("a0", 0, 0.50, 0.40, model="m1"), run("a1", 1, 0.70, 0.60, model="m1"),
            run("a2", 2, 0.99, finished=False, model="m1"), run("b0", 0, 0.80, model="m2")]
    runs[0]["params"] = runs[1]["params"] = 1000
    summary = stats.summarize(runs, [("model", ["m1", "m2"])])
    m1, m2 = summary["variants"]
    assert m1["label"] == "m1" and m1["seeds"] == [0, 1] and m1["params"] == 1000
    assert m1["best"] == {"mean": pytest.approx(0.6), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert m1["final"]["mean"] == pytest.approx(0.5)
    assert m2["best"] == {"mean": 0.8, "std": None, "n": 1}
    assert summary["unfinished"] == ["a2"]
    text = stats.format_text(summary)
    assert "3 of 4 runs finished" in text and "60.0 ± 14.1" in text and "a2: epoch 1 of 2" in text
    assert "m2 vs m1: +30.0 points (1 seed): no interval" in text
    markdown = stats.format_markdown(summary)
    assert "| m1 | 2 | 60.0 ± 14.1 | 50.0 ± 14.1 | 1.0K |" in markdown


def test_one_variant_has_nothing_to_compare():
    summary = stats.summarize(seeds_of("m", [0.5, 0.6]), [])
    assert [v["label"] for v in summary["variants"]] == ["all runs"] and summary["comparisons"] == []
