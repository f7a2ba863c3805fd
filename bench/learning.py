"""Online-learning benchmark: a real drift scenario on scikit-learn's digits.

Usage: python bench/learning.py [--seeds N] [--seed-offset K] [--quick] [--no-river]

Per seed the 1,797 digits are split at random into a held-out test set (360, never
trained on, used only for reporting), a pre-drift training set (600) for the first
model (the quickstart's MLP 64-128-128-10) and a stream (837). The stream is served one
sample at a time and its label arrives after the prediction; after ``t0`` labels the
inputs drift (pixel intensities inverted, x -> 1 - x). On the same stream:

* static — the first model throughout;
* torchops — ReplayBuffer + IncrementalTrainer on a copy of the champion's TorchScript
  archive every ``update_every`` labels; each challenger is judged by the gate on the
  next labels it has not trained on (and on half the reference sample, for retention),
  promoted when the gate says so, then watched by the rollback guard;
* full retrain — a fresh model trained on everything seen so far, every
  ``update_every`` labels (the upper bound);
* River — online logistic regression (one-vs-rest) behind a StandardScaler.

Printed: prequential accuracy over time and after the drift, held-out accuracy
``recover_after`` labels after the drift against the full retrain's, every promotion
checked against its parent on the held-out test set, and a poisoned-feedback run
(labels flipped from ``t1`` on) that must end with a good version serving.
Settings were chosen on seeds 1000-1019 (``--seed-offset 1000``), never on the seeds
reported by default (0-19) nor on the held-out test sets. One disclosure: a first run on
seeds 0-19 with the gate at alpha 0.05 promoted two models one test sample worse than
their parents; alpha was then re-chosen (0.01) by counting marginal promotions on seeds
1000-1019 only.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from torchops.learning import (
    GateConfig,
    GuardConfig,
    IncrementalTrainer,
    Prequential,
    ReplayBuffer,
    TrainConfig,
    check_rollback,
    judge,
)
from torchops.quickstart.model import DigitsMLP
from torchops.runtime.torchscript import load_torchscript

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Scenario:
    """The stream, the learner's settings and what is compared."""

    seed: int = 0
    n_test: int = 360
    n_pretrain: int = 600
    t0: int = 200  # labels before the drift
    t1: int | None = None  # labels are flipped from here on (poisoned run)
    drift: bool = True
    recover_after: int = 500
    update_every: int = 50
    reference_size: int = 600  # half anchors (trained on), half retention check
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, steps=200, batch_size=64)
    )
    gate: GateConfig = field(
        default_factory=lambda: GateConfig(
            min_gain=0.01, min_samples=100, alpha=0.01, min_retention=0.95
        )
    )
    # a challenger is judged when this many labels have come in since its training, each
    # look at alpha / len(looks) (Bonferroni), and retired after the last one
    looks: tuple[int, ...] = (100, 200, 300)
    guard: GuardConfig = field(default_factory=lambda: GuardConfig(min_samples=100, alpha=0.01))
    recent: int = 128
    reservoir: int = 1024
    recent_fraction: float = 0.5
    anchor_fraction: float = 0.25
    pretrain_epochs: int = 30
    retrain_epochs: int = 30
    full_retrain: bool = True  # every update_every labels (else only at the checkpoint)
    river: bool = True


@dataclass
class Promotion:
    t: int
    parent: int
    child: int
    parent_test: float
    child_test: float
    p_value: float | None
    gain: float


@dataclass
class SeedResult:
    seed: int
    prequential: dict[str, Prequential]
    test_at_recovery: dict[str, float]
    promotions: list[Promotion]
    rollbacks: int
    refused: int
    versions: int
    final_test: float
    first_test: float
    best_test: float
    trained_seconds: float


# -- data and models ------------------------------------------------------------------


def load_digits_arrays() -> tuple[Array, Array]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    return x, np.asarray(bunch.target, dtype=np.int64)


def drifted(x: Array) -> Array:
    """The drift: intensities inverted (16 - x on the original 0..16 scale)."""
    return (1.0 - x).astype(np.float32)


def fit(x: Array, y: Array, *, epochs: int, seed: int) -> DigitsMLP:
    """Train a fresh quickstart MLP from scratch (Adam 3e-3, batch 64)."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            index = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xt[index]), yt[index])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return model.eval()


def archive(model: nn.Module) -> bytes:
    """The trainable form the registry stores: a TorchScript archive."""
    out = io.BytesIO()
    torch.jit.save(torch.jit.script(model), out)
    return out.getvalue()


class Served:
    """A version loaded from its archive bytes the way the server loads it."""

    def __init__(self, data: bytes, version: int) -> None:
        self.data = data
        self.version = version
        self.module = load_torchscript(data)

    def logits(self, x: Array) -> Array:
        with torch.inference_mode():
            out: Array = self.module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return out

    def predict(self, x: Array) -> Array:
        return self.logits(x).argmax(axis=1)

    def accuracy(self, x: Array, y: Array) -> float:
        return float(np.mean(self.predict(x) == y))


def softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: Array = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


# -- one seed ---------------------------------------------------------------------------


@dataclass
class _Challenger:
    model: Served
    cutoff: int  # trained on labels [0, cutoff)


def run_seed(sc: Scenario) -> SeedResult:
    x_all, y_all = load_digits_arrays()
    rng = np.random.default_rng(sc.seed)
    order = rng.permutation(len(x_all))
    test_i = order[: sc.n_test]
    pre_i = order[sc.n_test : sc.n_test + sc.n_pretrain]
    stream_i = order[sc.n_test + sc.n_pretrain :]
    x_pre, y_pre = x_all[pre_i], y_all[pre_i]
    x_test, y_test = x_all[test_i], y_all[test_i]
    n = len(stream_i)
    xs = x_all[stream_i].copy()
    if sc.drift:
        xs[sc.t0 :] = drifted(xs[sc.t0 :])
    ys_true = y_all[stream_i]
    ys = ys_true.copy()  # the labels that arrive (possibly poisoned)
    if sc.t1 is not None:
        ys[sc.t1 :] = (9 - ys[sc.t1 :]) % 10

    def test_set(t: int) -> tuple[Array, Array]:
        return (drifted(x_test) if sc.drift and t >= sc.t0 else x_test), y_test

    first = fit(x_pre, y_pre, epochs=sc.pretrain_epochs, seed=sc.seed)
    champion = Served(archive(first), 1)
    ref = x_pre[rng.choice(len(x_pre), size=sc.reference_size, replace=False)]
    anchors, retention_x = ref[: sc.reference_size // 2], ref[sc.reference_size // 2 :]

    # (b) torchops online learning
    buffer = ReplayBuffer(
        recent=sc.recent,
        reservoir=sc.reservoir,
        recent_fraction=sc.recent_fraction,
        anchor_fraction=sc.anchor_fraction,
        n_classes=10,
        seed=sc.seed,
    )
    buffer.add_anchor({"x": anchors}, softmax(champion.logits(anchors)))
    versions = 1
    pending: list[_Challenger] = []
    promotions: list[Promotion] = []
    refused = rollbacks = 0
    watch: tuple[Served, int] | None = None  # (parent, promoted at t)
    online = Prequential(window=50)
    first_test = champion.accuracy(*test_set(n))
    test_at: dict[str, float] = {}
    trained_seconds = 0.0
    checkpoint = sc.t0 + sc.recover_after
    look_gate = replace(sc.gate, min_samples=sc.looks[0], alpha=sc.gate.alpha / len(sc.looks))

    for i in range(n):
        t = i + 1
        online.update(ys_true[i : i + 1], champion.predict(xs[i : i + 1]))
        buffer.add({"x": xs[i : i + 1]}, ys[i : i + 1])  # the label arrives after the prediction
        if watch is not None and t - watch[1] >= sc.guard.min_samples:
            parent, since = watch
            window = slice(since, t)
            decision = check_rollback(
                "classification",
                ys[window],
                champion.predict(xs[window]),
                parent.predict(xs[window]),
                sc.guard,
            )
            if decision.rollback:
                champion = parent
                rollbacks += 1
            watch = None
        for challenger in list(pending):
            if t - challenger.cutoff not in sc.looks:
                continue
            window = slice(challenger.cutoff, t)
            verdict = judge(
                "classification",
                ys[window],
                champion.predict(xs[window]),
                challenger.model.predict(xs[window]),
                look_gate,
                reference=(champion.predict(retention_x), challenger.model.predict(retention_x)),
            )
            if not verdict.promote:
                if t - challenger.cutoff == sc.looks[-1]:
                    pending.remove(challenger)
                    refused += 1
                continue
            pending.remove(challenger)
            tx, ty = test_set(t)
            promotions.append(
                Promotion(
                    t=t,
                    parent=champion.version,
                    child=challenger.model.version,
                    parent_test=champion.accuracy(tx, ty),
                    child_test=challenger.model.accuracy(tx, ty),
                    p_value=verdict.p_value,
                    gain=verdict.gain,
                )
            )
            watch = (champion, t)
            champion = challenger.model
            # older challengers were trained on less than the new champion: retire them
            pending = [c for c in pending if c.cutoff > challenger.cutoff]
        if t % sc.update_every == 0 and t + sc.looks[0] <= n:
            start = time.perf_counter()
            result = IncrementalTrainer(replace(sc.train, seed=sc.seed * 1000 + t)).train(
                champion.data, buffer
            )
            trained_seconds += time.perf_counter() - start
            versions += 1
            pending.append(_Challenger(Served(result.torchscript, versions), cutoff=t))
        if t == checkpoint:
            test_at["torchops"] = champion.accuracy(*test_set(t))
            test_at["static"] = Served(archive(first), 1).accuracy(*test_set(t))

    prequential: dict[str, Prequential] = {"torchops": online}
    static = Prequential(window=50)
    static_model = Served(archive(first), 1)
    static.update(ys_true, static_model.predict(xs))
    prequential["static"] = static

    # (c) periodic full retrain on everything seen so far (pre-drift set + stream labels)
    if sc.full_retrain:
        retrain = Prequential(window=50)
        serving: nn.Module = first
        for start in range(0, n, sc.update_every):
            stop = min(start + sc.update_every, n)
            with torch.inference_mode():
                pred = serving(torch.from_numpy(xs[start:stop])).argmax(1).numpy()
            retrain.update(ys_true[start:stop], pred)
            if stop < n:
                serving = fit(
                    np.concatenate([x_pre, xs[:stop]]),
                    np.concatenate([y_pre, ys[:stop]]),
                    epochs=sc.retrain_epochs,
                    seed=sc.seed + stop,
                )
            if stop == checkpoint:
                with torch.inference_mode():
                    tx, ty = test_set(stop)
                    test_at["full retrain"] = float(
                        np.mean(serving(torch.from_numpy(tx)).argmax(1).numpy() == ty)
                    )
        prequential["full retrain"] = retrain
    elif checkpoint <= n:
        model = fit(
            np.concatenate([x_pre, xs[:checkpoint]]),
            np.concatenate([y_pre, ys[:checkpoint]]),
            epochs=sc.retrain_epochs,
            seed=sc.seed + checkpoint,
        )
        with torch.inference_mode():
            tx, ty = test_set(checkpoint)
            test_at["full retrain"] = float(
                np.mean(model(torch.from_numpy(tx)).argmax(1).numpy() == ty)
            )

    # (d) River: online logistic regression on the same features
    if sc.river:
        prequential["river"], test_at["river"] = run_river(
            x_pre, y_pre, xs, ys, ys_true, test_set(checkpoint), checkpoint
        )

    final_x, final_y = test_set(n)
    return SeedResult(
        seed=sc.seed,
        prequential=prequential,
        test_at_recovery=test_at,
        promotions=promotions,
        rollbacks=rollbacks,
        refused=refused,
        versions=versions,
        final_test=champion.accuracy(final_x, final_y),
        first_test=first_test,
        best_test=max([first_test, *(p.child_test for p in promotions)]),
        trained_seconds=trained_seconds,
    )


def run_river(
    x_pre: Array,
    y_pre: Array,
    xs: Array,
    ys: Array,
    ys_true: Array,
    test: tuple[Array, Array],
    checkpoint: int,
) -> tuple[Prequential, float]:
    """River's one-vs-rest logistic regression: one pass over the pre-drift set, then the
    stream test-then-train."""
    from river import linear_model, multiclass, preprocessing

    model = preprocessing.StandardScaler() | multiclass.OneVsRestClassifier(
        linear_model.LogisticRegression()
    )
    names = [f"p{j}" for j in range(xs.shape[1])]

    def row(v: Array) -> dict[str, float]:
        return dict(zip(names, v.tolist(), strict=True))

    for v, label in zip(x_pre, y_pre, strict=True):
        model.learn_one(row(v), int(label))
    score = Prequential(window=50)
    test_accuracy = float("nan")
    for i, (v, label) in enumerate(zip(xs, ys, strict=True)):
        guess = model.predict_one(row(v))
        score.update(ys_true[i : i + 1], np.array([-1 if guess is None else int(guess)]))
        model.learn_one(row(v), int(label))
        if i + 1 == checkpoint:
            tx, ty = test
            hits = [model.predict_one(row(v2)) == int(c) for v2, c in zip(tx, ty, strict=True)]
            test_accuracy = float(np.mean(hits))
    return score, test_accuracy


# -- reporting ----------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(
    results: list[SeedResult],
    poisoned: list[SeedResult],
    sc: Scenario,
    unchecked: list[SeedResult] | None = None,
) -> dict[str, Any]:
    methods = list(results[0].prequential)
    t0 = sc.t0
    print(f"\n== drift scenario: {len(results)} seeds, drift after {t0} labels ==")
    print("prequential accuracy per 50 labels (mean over seeds; the drift is at t0):")
    curves = {m: [r.prequential[m].curve() for r in results] for m in methods}
    ts = [t for t, _ in curves[methods[0]][0]]
    print("  t-t0 " + "".join(f"{m:>14}" for m in methods))
    for k, t in enumerate(ts):
        cells = "".join(f"{_mean([c[k][1] for c in curves[m]]):>14.3f}" for m in methods)
        print(f"  {t - t0:>4} {cells}")
    after = {m: [r.prequential[m].after(t0) for r in results] for m in methods}
    within = {m: [r.prequential[m].after(t0, sc.recover_after) for r in results] for m in methods}
    print("after the drift (prequential, mean ± sd over seeds):")
    for m in methods:
        print(
            f"  {m:<13} all post-drift {_mean(after[m]):.3f} ± {statistics.pstdev(after[m]):.3f}"
            f"   first {sc.recover_after}: {_mean(within[m]):.3f}"
        )
    held = {m: [r.test_at_recovery[m] for r in results] for m in results[0].test_at_recovery}
    print(f"held-out accuracy {sc.recover_after} labels after the drift:")
    for m, values in held.items():
        if values:
            print(f"  {m:<13} {_mean(values):.3f} (min {min(values):.3f})")
    ratios = [r.test_at_recovery["torchops"] / r.test_at_recovery["full retrain"] for r in results]
    promotions = [p for r in results for p in r.promotions]
    worse = [p for r in results + poisoned for p in r.promotions if p.child_test < p.parent_test]
    print(
        f"recovery vs full retrain: mean {_mean(ratios):.3f}, min {min(ratios):.3f}, "
        f"seeds >= 0.95: {sum(x >= 0.95 for x in ratios)}/{len(ratios)}"
    )
    refused = sum(r.refused for r in results)
    rollbacks = sum(r.rollbacks for r in results)
    print(
        f"promotions: {len(promotions)} in {len(results)} seeds "
        f"(refused {refused}, rollbacks {rollbacks}); "
        f"mean held-out gain over the parent "
        f"{_mean([p.child_test - p.parent_test for p in promotions]):+.3f}; "
        f"training {_mean([r.trained_seconds / max(r.versions - 1, 1) for r in results]):.3f} s "
        "per update"
    )
    river_gap = None
    if "river" in after:
        river_gap = _mean(after["torchops"]) - _mean(after["river"])
        print(f"torchops - River after the drift: {river_gap * 100:+.1f} points")
    poisoned_ok = None
    if poisoned:
        print(f"\n== poisoned feedback: no drift, every label flipped (9 - y) after {t0} labels ==")
        for r in poisoned:
            print(
                f"  seed {r.seed}: promotions {len(r.promotions)}, refused {r.refused}, "
                f"rollbacks {r.rollbacks}; serving at the end: {r.final_test:.3f} held-out "
                f"(first version {r.first_test:.3f}, best {r.best_test:.3f})"
            )
        # good = no worse than the best version ever promoted, within one test sample
        poisoned_ok = all(r.final_test >= r.best_test - 1 / sc.n_test for r in poisoned)
    if unchecked:
        print(
            "  the same runs without the gate's retention check: "
            f"{sum(len(r.promotions) for r in unchecked)} promotions, serving at the end "
            f"{_mean([r.final_test for r in unchecked]):.3f} held-out on average"
        )
    targets = {
        "recovery >= 0.95 of full retrain": _mean(ratios) >= 0.95,
        "zero worse promotions": not worse,
        "beat River by >= 5 points": None if river_gap is None else river_gap >= 0.05,
        "poisoned run ends on a good version": poisoned_ok,
    }
    print("\ntargets:")
    for name, ok in targets.items():
        print(f"  {name:<38} {'n/a' if ok is None else ('PASS' if ok else 'FAIL')}")
    if worse:
        for p in worse:
            print(f"  worse promotion: v{p.parent} -> v{p.child} at t={p.t}: {p}")
    return {"ratios": ratios, "worse": worse, "river_gap": river_gap, "poisoned_ok": poisoned_ok}


def run(
    seeds: list[int],
    *,
    river: bool,
    full_retrain: bool,
    poisoned_seeds: list[int],
    compare_unchecked: bool = False,
    progress: Callable[[str], None] = print,
    **overrides: Any,
) -> tuple[list[SeedResult], list[SeedResult], list[SeedResult], Scenario]:
    base = Scenario(river=river, full_retrain=full_retrain, **overrides)
    results = []
    for seed in seeds:
        start = time.perf_counter()
        results.append(run_seed(replace(base, seed=seed)))
        progress(f"seed {seed} done in {time.perf_counter() - start:.1f} s")
    poison = replace(base, drift=False, t1=base.t0, river=False, full_retrain=False)
    poisoned = [run_seed(replace(poison, seed=seed)) for seed in poisoned_seeds]
    unchecked = []
    if compare_unchecked:
        no_check = replace(poison, gate=replace(poison.gate, min_retention=None))
        unchecked = [run_seed(replace(no_check, seed=seed)) for seed in poisoned_seeds]
    return results, poisoned, unchecked, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--poisoned-seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, no River")
    parser.add_argument("--no-river", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_seeds = 2 if args.quick else args.seeds
    seeds = list(range(args.seed_offset, args.seed_offset + n_seeds))
    poisoned_seeds = seeds[: 1 if args.quick else args.poisoned_seeds]
    results, poisoned, unchecked, sc = run(
        seeds,
        river=not (args.quick or args.no_river),
        full_retrain=not args.quick,
        poisoned_seeds=poisoned_seeds,
        compare_unchecked=not args.quick,
    )
    report(results, poisoned, sc, unchecked)


if __name__ == "__main__":
    main()
