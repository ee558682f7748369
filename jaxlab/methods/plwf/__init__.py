"""PLwF: Progressive Learning without Forgetting (Feng et al., arXiv 2211.15215; spec ../shared/papers/plwf.md),
with its baselines (fine-tuning, LwF, EWC, joint training) in one task-sequence runner on the trainer.

    jaxlab train  --config plwf:tiny                          # PLwF on split digits (5 tasks x 2 classes)
    jaxlab train  --config plwf:tiny --config.cl.method=lwf   # a baseline
    jaxlab report --config plwf:tiny                          # every method x protocol x seed, table + heat maps

Pieces: `task` (the runner: stages, parts, losses per method), `losses` (cross-entropy per protocol,
distillation with every snapshot in one vmapped forward, EWC), `credit` (the credit-assignment optax
transformation), `data` (task splits of any labelled source), `metrics` (accuracy matrix, average accuracy,
forgetting, backward transfer, heat map), `report`.

What is the paper's and what is inferred. No official code exists and only the abstract was reachable.
From the abstract: no old data is used; the model functions (frozen snapshots) of ALL previous tasks are
densely brought in to build the knowledge space; credit assignment in the optimizer removes gradient
conflict by projection. INFERRED (spec "Method (inferred)" and our own choices, each a config key):
- the architecture: a shared backbone with one linear head per task (multi-head; class-incremental
  evaluation concatenates the heads); the snapshot after task k is the whole network then;
- the loss: L = CE_t + lambda * sum_{k<t} KD_T(head k of the network, head k of snapshot k) on the current
  task's inputs, KD the Hinton / LwF distillation (KL at temperature T = 2, per head, summed over heads),
  lambda = 1; `cl.distill_latest` also adds LwF's term (all old heads from the latest snapshot);
- credit assignment: g_n = grad of CE_t, g_o = grad of the distillation term; if <g_n, g_o> < 0, g_n is
  projected off g_o (cl.project="new"; "old" and PCGrad's "both" as options); step on g_n + g_o; globally
  or per layer (a layer = the parameters of one module); "sum" is the ablation;
- the training protocol: new-task CE over the current head (task-incremental) or over all seen classes
  (class-incremental), Adam reset at every task (cl.steps_per_task steps each), no warm-up phase;
- baselines as in their papers / FACIL: LwF (Li & Hoiem 2016: latest snapshot, T = 2), EWC (Kirkpatrick
  et al. 2017: sum of per-task diagonal-Fisher penalties, Fisher as the exact expectation over the model's
  predictive distribution, cl.fisher), joint training on all data seen so far (upper bound), fine-tuning;
- data: the class order of each split is 0, 1, 2, ... unless cl.class_order_seed >= 0; the paper's
  network, optimiser, epochs and CIFAR-100 / TinyImageNet class orders are unknown (the paper variants use
  FACIL's ResNet-32 and common settings, not numbers from the paper).
"""

from __future__ import annotations

from jaxlab.methods.plwf.task import build_method


def build(config):
    """The continual-learning Method of config.cl (jaxlab.methods.plwf.task)."""
    return build_method(config)


def report(config, workdir):
    """Every method of config.report.methods x protocol x seed; see jaxlab.methods.plwf.report."""
    from jaxlab.methods.plwf.report import report as run_report

    return run_report(config, workdir)
