"""Backdoor defenses run against a classifier `classify(images (B, H, W, C) in [0, 1]) -> logits (B, K)`
(the released vanilla model's final exit, or the victim's multi-exit model answering by early exit).

Neural Cleanse (Wang et al. 2019; its code bolunwang/backdoor visualizer.py, gtsrb_visualize_example.py):
for every class c, optimise a mask m (H, W, 1) and a pattern p (H, W, C), each tanh(param) / (2 - eps) +
0.5, so that (1 - m) x + m p is classified as c (x in [0, 1]; the model normalises after the mask, as NC
masks in the raw domain), minimising CE + cost * |m|_1 (norm="l1", NC; "l2" is the multi-exit
reference's torch.norm(mask, 2)); Adam lr 0.1, betas (0.5, 0.9), batches of 32; an epoch is N / 32
shuffled batches (NC: 1000 // 32 = 31) and is judged by its mean attack success. NC's schedule: mask and
pattern start uniform at random (init="random"; the multi-exit reference's neural_cleanse.py starts the
tanh parameters at 1: init="ones"), the cost starts at 0 and becomes init_cost (1e-3) after `patience`
(5) epochs at >= 99% success (cost_from_zero; the reference starts at init_cost), then x2 after 5
successful epochs and / 2 ** 1.5 after 5 failing ones; the kept mask is the smallest-norm one among
epochs at >= 99%; a class stops early once its cost went both up and down and its best norm has not
improved for `early_stop_patience` (25) epochs (NC's threshold 1.0), at most `epochs` (1000). All classes
run together (one forward of K x B images a step; stopped classes are held). Each step is one jitted
call from Python: XLA:CPU runs convolutions ~5x slower inside a scan / while loop (measured on the
ResNet-8: 4.1 s vs 0.8 s a step). Outliers (mad_outlier_detection.py): the L1 norms' median and MAD
(1.4826 x median absolute deviation); anomaly index of class c = |norm_c - median| / MAD; a class
below the median with index > 2 is flagged, and the model is called backdoored when any class is.

STRIP (Gao et al. 2019): each input is superimposed on `overlays` held-out clean images (x + o clipped
to [0, 1]; STRIP's code applies cv2.addWeighted(x, 1, o, 1) to float images, unclipped, and the
multi-exit reference's STRIP.ipynb blends 0.5 x + 0.5 o: on the report's control all three give FAR
93-99% at FRR 1%), and the mean softmax entropy over the overlays is its
score; trojaned inputs have low entropy. The threshold is the FRR-quantile of clean inputs' scores
(FRR 1%); FAR = the share of triggered inputs scoring above it (missed). STRIP is said to detect the
backdoor when it catches most triggered inputs (FAR < 0.5): this decision rule is ours (inferred).
The superimposition is STRIP's additive blend, so a trigger survives it only where it is saturated: a
white patch (the 5x5 square) stays white, but the checkerboard's black cells are filled by the overlay's
strokes (on digits they overlap it), which erases the trigger; then triggered inputs are as uncertain
as clean ones (FAR ~100% on the checkerboard-backdoored digits model), a limit of STRIP, not a bug.
On the report's control (ResNet-8 on 32x32 digits, white square) the trigger does survive (97% of
triggered blends still answer 9, mean p(9) 0.88), but blends of two clean digits are answered
confidently too (mean max softmax 0.82), so clean entropies (1st percentile 0.10) reach below most
triggered ones (median 0.30): FAR ~95% at FRR 1%. STRIP's premise, that a superimposed clean input is
uncertain, fails on this model (the test's plain CNN on 16x16 digits meets it).

DF-TND (Wang et al. 2020, data-free; the multi-exit reference's DFTND/dftnd.ipynb): random-noise
images are driven by L-inf PGD (1000 steps of 0.1 x sign, eps 1, in [0, 1]) to maximise the mean of
the penultimate representation; a trojaned class's logit rises far more than the others' (`df_tnd`).
The reference flags a class whose mean logit increase exceeds a preset T = 100 (scale-dependent:
reported as "over_threshold"); our decision is NC's MAD rule on the increases (index > 2, above the
median).

Fine-pruning (Liu et al. 2018): (1) pruning: the channels of the backbone's last block are pruned
(zeroed) in increasing order of their mean activation on clean images (the dormant ones first), and
clean accuracy / ASR of every exit are measured at each pruned fraction; the largest fraction that
keeps the final exit's clean accuracy within `max_drop` of the unpruned one is kept (`prune_fraction`);
(2) fine-tuning: the pruned backbone (pruned channels held at zero, BatchNorm statistics frozen) is
trained on clean data (`fine_tune`), and clean accuracy / ASR are measured again (the victim's ICs read
the fine-tuned backbone). It is said to remove the backdoor when after both steps the final exit's ASR
is below half its unpruned value while clean accuracy dropped by less than 10 points (ours).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.losses import softmax_cross_entropy
from jaxlab.models.exits import early_exit

Classifier = Callable[[jax.Array], jax.Array]
MAD_CONSISTENCY = 1.4826
NC_EPSILON = 1e-7  # Keras' K.epsilon() in NC's tanh(x) / (2 - eps) + 0.5


def anomaly_indices(norms: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-class anomaly index |norm - median| / (1.4826 MAD), the min-norm class's index)."""
    norms = np.asarray(norms, np.float64)
    median = np.median(norms)
    mad = MAD_CONSISTENCY * np.median(np.abs(norms - median))
    index = np.abs(norms - median) / max(mad, 1e-12)
    return index, float(np.abs(norms.min() - median) / max(mad, 1e-12))


def neural_cleanse(classify: Classifier, images: np.ndarray, num_classes: int, *, epochs: int = 1000,
                   batches_per_epoch: int | None = None, lr: float = 0.1, init_cost: float = 1e-3,
                   batch_size: int = 32, norm: str = "l1", success: float = 0.99, patience: int = 5,
                   multiplier: float = 2.0, early_stop_patience: int = 25, early_stop_threshold: float = 1.0,
                   init: str = "random", cost_from_zero: bool = True, seed: int = 0) -> dict:
    """Reverse-engineers a trigger per class (module docstring). images (N, H, W, C) in [0, 1].
    An epoch is `batches_per_epoch` (default N // batch_size) Adam steps on shuffled batches of
    batch_size images; at most `epochs` epochs, each class stopping early on its own. Returns {"norms"
    (K,) L1 norms of the kept masks, "anomaly" (K,), "anomaly_index" (the min-norm class's), "flagged"
    [classes], "detected", "masks" (K, H, W), "patterns" (K, H, W, C), "success" (K,) attack success of
    the kept triggers, "epochs" (K,) epochs each class ran}."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"Neural Cleanse norm must be 'l1' (paper) or 'l2' (reference), got {norm!r}")
    if init not in ("random", "ones"):
        raise ValueError(f"Neural Cleanse init must be 'random' (NC's code) or 'ones' (the reference), got {init!r}")
    if len(images) < batch_size:
        raise ValueError(f"Neural Cleanse needs at least batch_size={batch_size} images, got {len(images)}")
    k, (h, w, c) = num_classes, images.shape[1:]
    steps = batches_per_epoch or len(images) // batch_size
    tx = optax.adam(lr, b1=0.5, b2=0.9)
    labels = jnp.arange(k)

    def regs(mask):  # (K, H, W, 1) -> (K,)
        flat = mask.reshape(k, -1)
        return jnp.abs(flat).sum(1) if norm == "l1" else jnp.sqrt(jnp.square(flat).sum(1))

    def loss_fn(params, x, cost):  # every class's trigger on the same batch x (B, H, W, C), one forward
        mask, pattern = _nc_unit(params["mask"]), _nc_unit(params["pattern"])
        mixed = (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]  # (K, B, H, W, C)
        logits = classify(mixed.reshape(-1, h, w, c)).reshape(k, x.shape[0], -1)
        ce = softmax_cross_entropy(logits, jnp.broadcast_to(labels[:, None], logits.shape[:2])).mean(1)
        r = regs(mask)
        return (ce + cost * r).sum(), (jnp.mean(logits.argmax(-1) == labels[:, None], 1), r)

    @jax.jit
    def step(params, opt_state, x, cost, live):  # the classes' losses are independent: one summed grad
        grads, (acc, r) = jax.grad(loss_fn, has_aux=True)(params, x, cost)
        updates, new_state = tx.update(grads, opt_state, params)
        keep = lambda new, old: jnp.where(live.reshape((k,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        new_params = jax.tree_util.tree_map(keep, optax.apply_updates(params, updates), params)
        mu, nu = (jax.tree_util.tree_map(keep, a, b) for a, b in ((new_state[0].mu, opt_state[0].mu),
                                                                 (new_state[0].nu, opt_state[0].nu)))
        return new_params, (new_state[0]._replace(mu=mu, nu=nu), *new_state[1:]), acc, r

    rng = np.random.default_rng(seed)
    if init == "random":  # NC's code: mask ~ U(0, 1) (H, W), pattern ~ U(0, 255) (H, W, C), to [0, 1]
        params = {"mask": _nc_param(rng.random((k, h, w, 1))), "pattern": _nc_param(rng.random((k, h, w, c)))}
    else:  # the multi-exit reference's neural_cleanse.py: tanh parameters at 1
        params = {"mask": jnp.ones((k, h, w, 1)), "pattern": jnp.ones((k, h, w, c))}
    opt_state = tx.init(params)
    s = _NCSchedule(k, init_cost, 0.0 if cost_from_zero else init_cost, patience, multiplier)
    best_mask, best_pattern = (np.array(_nc_unit(params[n])) for n in ("mask", "pattern"))
    reg_best, best_acc = np.full(k, np.inf), np.zeros(k)
    es_best, es_count, done, ran = np.full(k, np.inf), np.zeros(k, int), np.zeros(k, bool), np.zeros(k, int)
    for _ in range(epochs):
        if done.all():
            break
        order = rng.permutation(len(images))
        order = np.resize(order, steps * batch_size).reshape(steps, batch_size)
        accs, rs = [], []
        for idx in order:
            params, opt_state, acc, r = step(params, opt_state, jnp.asarray(images[idx]),
                                             jnp.asarray(s.cost, jnp.float32), jnp.asarray(~done))
            accs.append(acc), rs.append(r)
        acc, r, live = np.mean(accs, 0), np.mean(rs, 0), ~done
        ran += live
        better = live & (acc >= success) & (r < reg_best)
        best_mask[better], best_pattern[better] = (np.asarray(_nc_unit(params[n]))[better] for n in ("mask", "pattern"))
        reg_best[better], best_acc[better] = r[better], acc[better]
        # early stop (NC's visualize): once a trigger is found, count the epochs whose best norm did not
        # improve on the best so far by the threshold; stop after the cost went both up and down
        found = np.isfinite(reg_best)
        es_count = np.where(found, np.where(reg_best >= early_stop_threshold * es_best, es_count + 1, 0), es_count)
        es_best = np.minimum(es_best, reg_best)
        stop = live & s.up_flag & s.down_flag & (es_count >= early_stop_patience)
        done |= stop
        s.update(acc >= success, live & ~stop)
    found = np.isfinite(reg_best)  # no epoch reached `success`: the last mask, as NC's code
    last_mask, last_pattern = (np.asarray(_nc_unit(params[n])) for n in ("mask", "pattern"))
    masks = np.where(found[:, None, None, None], best_mask, last_mask)[..., 0]
    patterns = np.where(found[:, None, None, None], best_pattern, last_pattern)
    norms = np.abs(masks).reshape(k, -1).sum(1)
    anomaly, index = anomaly_indices(norms)
    flagged = [int(j) for j in np.flatnonzero((anomaly > 2) & (norms < np.median(norms)))]
    return {"norms": norms, "anomaly": anomaly, "anomaly_index": index, "flagged": flagged,
            "detected": bool(flagged), "masks": masks, "patterns": patterns,
            "success": np.where(found, best_acc, 0.0), "epochs": ran}


def _nc_unit(t):
    """NC's tanh parametrisation: tanh(t) / (2 - eps) + 0.5 in (0, 1)."""
    return jnp.tanh(t) / (2 - NC_EPSILON) + 0.5


def _nc_param(u):
    """The inverse of _nc_unit (NC's reset_state: arctanh((u - 0.5) * (2 - eps)))."""
    return jnp.arctanh((jnp.asarray(u, jnp.float32) - 0.5) * (2 - NC_EPSILON))


class _NCSchedule:
    """NC's balance-cost schedule per class (visualizer.py), numpy arrays (K,): the cost starts at `start`
    (0 in NC's code) and is set to init_cost after `patience` successful epochs at 0; then it is
    multiplied by `multiplier` after `patience` successful epochs and divided by multiplier ** 1.5
    after `patience` failing ones (up_flag / down_flag record that it went up / down)."""

    def __init__(self, k: int, init_cost: float, start: float, patience: int, multiplier: float):
        self.cost = np.full(k, start)
        self.init_cost, self.patience, self.multiplier = init_cost, patience, multiplier
        self.set_count, self.up, self.down = (np.zeros(k, int) for _ in range(3))
        self.up_flag, self.down_flag = np.zeros(k, bool), np.zeros(k, bool)

    def update(self, good: np.ndarray, live: np.ndarray) -> None:
        """One epoch's adjustment for the classes `live`; good: the epoch's attack success >= threshold."""
        old = {n: getattr(self, n).copy() for n in ("cost", "set_count", "up", "down", "up_flag", "down_flag")}
        self.set_count = np.where((self.cost == 0) & good, self.set_count + 1, 0)
        start = self.set_count >= self.patience
        self.cost = np.where(start, self.init_cost, self.cost)
        self.up_flag, self.down_flag = self.up_flag & ~start, self.down_flag & ~start
        self.up, self.down = np.where(start, 0, self.up), np.where(start, 0, self.down)
        self.up, self.down = np.where(good, self.up + 1, 0), np.where(good, 0, self.down + 1)
        raise_cost = self.up >= self.patience
        lower_cost = ~raise_cost & (self.down >= self.patience)
        self.cost = np.where(raise_cost, self.cost * self.multiplier,
                             np.where(lower_cost, self.cost / self.multiplier ** 1.5, self.cost))
        self.up, self.down = np.where(raise_cost, 0, self.up), np.where(lower_cost, 0, self.down)
        self.up_flag, self.down_flag = self.up_flag | raise_cost, self.down_flag | lower_cost
        for name, value in old.items():  # stopped classes keep their schedule
            setattr(self, name, np.where(live, getattr(self, name), value))


def strip_scores(classify: Classifier, inputs: np.ndarray, overlays: np.ndarray, *, seed: int = 0,
                 batch_size: int = 64) -> np.ndarray:
    """(N,) STRIP entropy of each input: mean over the P overlays of the entropy (nats) of
    softmax(classify(clip(x + overlay, 0, 1)))."""
    overlays = jnp.asarray(overlays)

    @jax.jit
    def score(x):  # (B, H, W, C) -> (B,)
        mixed = jnp.clip(x[:, None] + overlays[None], 0.0, 1.0)
        logits = classify(mixed.reshape(-1, *x.shape[1:])).reshape(x.shape[0], overlays.shape[0], -1)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -(jnp.exp(logp) * logp).sum(-1).mean(-1)

    return np.concatenate([np.asarray(score(jnp.asarray(inputs[i:i + batch_size])))
                           for i in range(0, len(inputs), batch_size)])


def strip_decision(clean_scores: np.ndarray, triggered_scores: np.ndarray, frr: float = 0.01) -> dict:
    """Threshold = the frr-quantile of the clean scores; {"threshold", "frr" (measured), "far" (triggered
    scoring at or above the threshold: missed), "detected" (far < 0.5)}."""
    threshold = float(np.quantile(clean_scores, frr))
    far = float(np.mean(triggered_scores >= threshold))
    return {"threshold": threshold, "frr": float(np.mean(clean_scores < threshold)), "far": far,
            "detected": far < 0.5}


def multi_exit_classifier(exits_fn: Callable[[jax.Array], jax.Array], tau: float, start: int = 0) -> Classifier:
    """The early-exit model as a classifier: images -> the logits of the exit that answers.
    exits_fn(images) -> (M, B, C) logits of every exit."""
    def classify(images):
        logits = exits_fn(images)
        chosen, _ = early_exit(jax.lax.stop_gradient(logits), tau, start)
        return jnp.take_along_axis(logits, chosen[None, :, None], axis=0)[0]

    return classify


def prune_order(last_tap: np.ndarray) -> np.ndarray:
    """Channel indices of a (N, h, w, C) or (N, C) activation in increasing order of mean activation."""
    return np.argsort(np.asarray(last_tap).reshape(-1, last_tap.shape[-1]).mean(0), kind="stable")


def channel_mask(order: np.ndarray, fraction: float) -> np.ndarray:
    """(C,) float32 mask zeroing the first round(fraction C) channels of `order`."""
    mask = np.ones(len(order), np.float32)
    mask[order[: int(round(fraction * len(order)))]] = 0.0
    return mask


def exit_rates(logits_fn: Callable[[jax.Array], jax.Array], clean: np.ndarray, labels: np.ndarray,
               triggered: np.ndarray, target: int) -> dict:
    """{"accuracy" on clean, "asr" on triggered non-target images}, per exit when logits_fn(images) gives
    (M, B, K) logits (then (M,) each), else scalars for (B, K)."""
    keep = labels != target
    acc = np.asarray(logits_fn(jnp.asarray(clean))).argmax(-1) == labels
    hit = np.asarray(logits_fn(jnp.asarray(triggered[keep]))).argmax(-1) == target
    return {"accuracy": acc.mean(-1), "asr": hit.mean(-1)}


def pruning_curve(logits_with_mask: Callable[[jax.Array, jax.Array], jax.Array], clean: np.ndarray,
                  labels: np.ndarray, triggered: np.ndarray, target: int, order: np.ndarray, fractions) -> list[dict]:
    """Fine-pruning's pruning step: for each fraction f (0 first), zero the first round(f C) channels of
    `order` and measure {"fraction", "accuracy" on clean, "asr" on triggered non-target}.
    logits_with_mask(images, channel_mask (C,)) -> (M, B, K) or (B, K) logits; for several exits each
    exit is measured."""
    rows = []
    for fraction in (0.0, *fractions):
        mask = jnp.asarray(channel_mask(order, fraction))
        rates = exit_rates(lambda images: logits_with_mask(images, mask), clean, labels, triggered, target)
        rows.append({"fraction": float(fraction), **rates})
    return rows


def prune_fraction(rows: list[dict], max_drop: float) -> float:
    """The largest pruned fraction of a `pruning_curve` whose final-exit clean accuracy is within max_drop
    of the unpruned model's (fine-pruning prunes until the clean accuracy starts to fall)."""
    final = lambda v: float(np.atleast_1d(v)[-1])  # noqa: E731
    base = final(rows[0]["accuracy"])
    return max(r["fraction"] for r in rows if final(r["accuracy"]) >= base - max_drop)


def fine_tune(logits_fn: Callable[[dict, jax.Array], jax.Array], params: dict, images: np.ndarray,
              labels: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int = 0) -> dict:
    """Fine-pruning's second step: `epochs` passes of shuffled clean batches (the last partial batch
    dropped), each an Adam(lr) step on the mean cross-entropy of logits_fn(params, images (B, H, W, C))
    -> (B, K) against labels (B,), one jitted step a batch. Returns the fine-tuned params."""
    n = len(images) // batch_size * batch_size
    if n == 0 or epochs <= 0:
        return params
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(images))[:n] for _ in range(epochs)]).reshape(-1, batch_size)
    tx = optax.adam(lr)

    @jax.jit  # one step a call: XLA:CPU runs convolutions ~5x slower inside a scan / while loop
    def step(p, opt_state, x, y):
        grads = jax.grad(lambda q: softmax_cross_entropy(logits_fn(q, x), y).mean())(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    opt_state = tx.init(params)
    for idx in order:
        params, opt_state = step(params, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    return params


def fine_pruning_decision(rows: list[dict], after: dict | None = None, exit_index: int = -1,
                          min_asr: float = 0.2) -> dict:
    """Removed when the pruned-and-fine-tuned model (`after`: {"accuracy", "asr"}, per exit or scalars;
    without it, some pruned fraction alone) has the ASR of exit `exit_index` (-1: the final exit; 0 for
    an early-exit model, which mostly answers there) below half its unpruned value with the final exit's
    clean accuracy down < 10 points. When the unpruned ASR is below min_asr there is no backdoor to
    remove there: "removed" is None."""
    final = lambda v: float(np.atleast_1d(v)[-1])  # noqa: E731
    at = lambda v: float(np.atleast_1d(v)[exit_index])  # noqa: E731
    base_acc, base_asr = final(rows[0]["accuracy"]), at(rows[0]["asr"])
    candidates = [after] if after is not None else rows[1:]
    removed = any(at(r["asr"]) < base_asr / 2 and final(r["accuracy"]) > base_acc - 0.10 for r in candidates)
    return {"removed": removed if base_asr >= min_asr else None, "base_asr": base_asr, "base_accuracy": base_acc,
            "exit": exit_index}


def df_tnd(classify: Classifier, features: Callable[[jax.Array], jax.Array], seeds: np.ndarray, *,
           steps: int = 1000, step_size: float = 0.1, eps: float = 1.0, threshold: float = 100.0) -> dict:
    """DF-TND, data-free trojan detection (Wang et al. 2020; the multi-exit reference's DFTND/dftnd.ipynb):
    from seed images (N, H, W, C) in [0, 1] (random noise: data-free), `steps` steps of L-inf PGD
    (x += step_size * sign(grad), projected to the eps ball around the seed and to [0, 1]; the
    robustness library's attacker) ascend the mean of the penultimate representation features(x) (B, D)
    (its activation_loss); a trojan shows as a class whose logit rises far more than the others'. Returns
    {"increase" (K,) mean logit increase of classify over the seeds, "top" (the class rising most),
    "over_threshold" [classes whose increase > threshold] (the reference's preset T = 100, which
    depends on the model's logit scale), "anomaly" (K,) and "anomaly_index" (the top class's) MAD
    anomaly indices of the increases, "flagged" [classes above the median with index > 2] (Neural
    Cleanse's outlier rule on the high side: ours, inferred), "detected" (any class flagged)}."""
    seeds = jnp.asarray(seeds, jnp.float32)

    @jax.jit  # one step a call: XLA:CPU runs convolutions ~5x slower inside a scan / while loop
    def step(x):
        grad = jax.grad(lambda v: features(v).mean())(x)
        x = x + step_size * jnp.sign(grad)
        return jnp.clip(jnp.clip(x, seeds - eps, seeds + eps), 0.0, 1.0)

    x = seeds
    for _ in range(steps):
        x = step(x)
    increase = np.asarray(classify(x) - classify(seeds), np.float64).mean(0)
    top = int(np.argmax(increase))
    index, _ = anomaly_indices(increase)
    flagged = [int(k) for k in np.flatnonzero((index > 2) & (increase > np.median(increase)))]
    return {"increase": increase, "top": top, "over_threshold": [int(k) for k in np.flatnonzero(increase > threshold)],
            "anomaly": index, "anomaly_index": float(index[top]), "flagged": flagged, "detected": bool(flagged)}
