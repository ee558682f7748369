"""`jaxlab bench torch`: conv-net train steps side by side with PyTorch on this machine (issue #20, item 1).

The CIFAR ResNets of He et al. 2016 with option-A shortcuts (jaxlab.models.resnet_cifar.ResNetCifar:
ResNet-20 is FL vs SplitNN's model, n = 3; ResNet-56, n = 9) against the same network written in
PyTorch here (`torch_resnet`: conv3x3 16 BN ReLU, three stages of basic blocks, shortcut = subsample and
zero-pad the channels, global average pool, linear). One train step: forward in training mode
(BatchNorm on batch statistics, running statistics updated), mean cross-entropy, backward, SGD with
momentum 0.9 (lr 0.1, no weight decay: optax.sgd and torch.optim.SGD compute the same update); batch 32
of 32x32x3 float32 inputs; PyTorch in its default NCHW layout and its default threads (one per core).

Before timing, jaxlab's initial weights are transplanted into the PyTorch network (conv HWIO -> OIHW,
dense (in, out) -> (out, in)) and both compute the same batch, in float32 and (PyTorch) in float64: jaxlab's
logits and every parameter's gradient must be as close to the float64 result as PyTorch's float32 ones
are (`agrees`), so both frameworks time the same arithmetic. jaxlab is timed twice: on one CPU device,
and with the CPU run as BENCH_CPU_DEVICES XLA devices with the batch split over them (`jaxlab
--cpu-devices N`, jaxlab.cli.use_cpu_devices). Each is timed in its own fresh process (a framework's idle
thread pool spinning would slow the other one in a shared process), alternating the three, ROUNDS times;
each process warms up, then times REPS runs of STEPS_PER_REP steps. The table gives the median and
range of ms per step over all runs, so a load change mid-bench shows as a wide range, not a wrong ratio.

torch is not a dependency of jaxlab: install it in the same environment (`pip install torch`, CPU wheels
suffice) or run this from an environment that has both. Without it the bench prints that and returns.
Run: `jaxlab bench torch [--quick] [--no-write]` or `python -m jaxlab.torch_bench`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from jaxlab.train.init_from import flatten

MODELS = {"resnet20": 3, "resnet56": 9}  # name -> blocks per stage
BENCH_CPU_DEVICES = 4  # the `--cpu-devices` row: the fastest count for ResNet-20 on 2 cores (8: slower)
BATCH, LR, MOMENTUM, NUM_CLASSES = 32, 0.1, 0.9, 10
ROUNDS, REPS, STEPS_PER_REP, WARMUP = 3, 5, 10, 5
AGREE_ATOL = 1e-4  # relative error vs float64 always accepted (logits, gradients), whatever PyTorch's own
INSTALL_HINT = ("PyTorch comparison skipped: torch is not importable here. Install it in this environment "
                "(pip install torch; CPU wheels suffice) and rerun `jaxlab bench torch`.")


def ms_per_step(run_steps) -> list[float]:
    """`run_steps(n)` runs n train steps and waits for them; WARMUP steps, then ms per step of REPS runs
    of STEPS_PER_REP steps."""
    run_steps(WARMUP)
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        run_steps(STEPS_PER_REP)
        times.append((time.perf_counter() - t0) / STEPS_PER_REP * 1e3)
    return times


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(BATCH, 32, 32, 3) float32 NHWC images and (BATCH,) int labels, fixed by seed."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BATCH, 32, 32, 3), dtype=np.float32),
            rng.integers(0, NUM_CLASSES, BATCH).astype(np.int64))


# ----------------------------------------------------------------------------------------------- jaxlab
def jax_setup(name: str, seed: int = 0):
    """(model, params, batch_stats) of jaxlab's option-A CIFAR ResNet `name`, initialised from seed."""
    import jax

    from jaxlab.models.resnet_cifar import ResNetCifar

    model = ResNetCifar(blocks_per_stage=MODELS[name], num_classes=NUM_CLASSES)
    x, _ = batch()
    variables = model.init(jax.random.PRNGKey(seed), x[:2], train=False)
    return model, variables["params"], variables["batch_stats"]


def jax_loss(model, params, batch_stats, x, y):
    """Mean cross-entropy in training mode; (loss, (logits, new batch_stats))."""
    import optax

    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, updates["batch_stats"])


def jax_step_fn(model):
    """The jitted train step (params, batch_stats, opt_state, x, y) -> (..., loss), state donated as the
    trainer does."""
    import functools

    import jax
    import optax

    tx = optax.sgd(LR, momentum=MOMENTUM)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, x, y):
        (loss, (_, batch_stats)), grads = jax.value_and_grad(
            lambda p: jax_loss(model, p, batch_stats, x, y), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return tx, step


def time_jax(name: str, devices: int = 1) -> list[float]:
    """ms per step of REPS runs of STEPS_PER_REP jaxlab steps, after WARMUP; with devices > 1 the CPU runs
    as that many XLA devices (`jaxlab --cpu-devices`) and the batch is split over them, the state
    replicated, as the trainer's data mesh does."""
    if devices > 1:
        from jaxlab.cli import use_cpu_devices

        use_cpu_devices(devices)
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    model, params, batch_stats = jax_setup(name)
    tx, step = jax_step_fn(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    x, y = (jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in batch())
    state = jax.device_put((params, batch_stats, tx.init(params)), replicated)

    def run_steps(n):
        nonlocal state
        for _ in range(n):
            *state, loss = step(*state, x, y)
        loss.block_until_ready()

    return ms_per_step(run_steps)


# ---------------------------------------------------------------------------------------------- PyTorch
def torch_resnet(blocks_per_stage: int):
    """The same option-A CIFAR ResNet in PyTorch (NCHW); module names mirror jaxlab's param tree."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv0 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(cout)
            self.conv1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = F.relu(self.bn0(self.conv0(x)))
            y = self.bn1(self.conv1(y))
            skip = x
            if self.stride != 1 or self.extra:
                skip = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + skip)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for stage, cout in enumerate((16, 32, 64)):
                for i in range(blocks_per_stage):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and i == 0 else 1))
                    cin = cout
            self.blocks = nn.ModuleList(blocks)
            self.fc = nn.Linear(64, NUM_CLASSES)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            for block in self.blocks:
                x = block(x)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return Net()


def param_pairs(net, blocks_per_stage: int) -> list[tuple[str, object, tuple[int, ...] | None]]:
    """(jaxlab param path, PyTorch parameter, axes taking jaxlab's layout to PyTorch's or None) for every
    parameter: conv HWIO -> OIHW, dense (in, out) -> (out, in), BatchNorm scale / bias as they are."""
    conv, dense = (3, 2, 0, 1), (1, 0)
    pairs = [("conv1/kernel", net.conv1.weight, conv), ("bn1/scale", net.bn1.weight, None),
             ("bn1/bias", net.bn1.bias, None)]
    names = [f"stage{s}_block{i}" for s in (1, 2, 3) for i in range(1, blocks_per_stage + 1)]
    for block, name in zip(net.blocks, names, strict=True):
        for j, (c, b) in enumerate(((block.conv0, block.bn0), (block.conv1, block.bn1))):
            pairs += [(f"{name}/Conv_{j}/kernel", c.weight, conv), (f"{name}/BatchNorm_{j}/scale", b.weight, None),
                      (f"{name}/BatchNorm_{j}/bias", b.bias, None)]
    return pairs + [("fc/kernel", net.fc.weight, dense), ("fc/bias", net.fc.bias, None)]


def transplant(net, params, blocks_per_stage: int) -> None:
    """Copy jaxlab's params into the PyTorch net (in place)."""
    import torch

    flat = flatten(params)
    with torch.no_grad():
        for path, param, axes in param_pairs(net, blocks_per_stage):
            value = np.asarray(flat[path])
            param.copy_(torch.from_numpy(np.array(value if axes is None else value.transpose(axes))))  # a copy


def torch_grads_as_jaxlab(net, blocks_per_stage: int) -> dict[str, np.ndarray]:
    """The PyTorch gradients in jaxlab's layouts, keyed by jaxlab's param paths ('stage1_block1/Conv_0/kernel')."""
    out = {}
    for path, param, axes in param_pairs(net, blocks_per_stage):
        grad = param.grad.detach().numpy()
        out[path] = grad if axes is None else grad.transpose(np.argsort(axes))
    return out


def time_torch(name: str) -> list[float]:
    """ms per step of REPS runs of STEPS_PER_REP PyTorch steps, after WARMUP."""
    import torch

    net = torch_resnet(MODELS[name]).train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = batch()
    x, y = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run_steps(n):  # PyTorch on CPU runs eagerly: each step is done when it returns
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

    return ms_per_step(run_steps)


# ------------------------------------------------------------------------------------------- comparison
def torch_logits_and_grads(name: str, params, x: np.ndarray, y: np.ndarray, dtype) -> tuple:
    """(logits, {param path: gradient in jaxlab's layout}) of the PyTorch net holding `params`, in `dtype`."""
    import torch

    net = torch_resnet(MODELS[name]).to(dtype).train()
    transplant(net, params, MODELS[name])
    logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dtype))
    torch.nn.CrossEntropyLoss()(logits, torch.from_numpy(y)).backward()
    return logits.detach().numpy(), torch_grads_as_jaxlab(net, MODELS[name])


def agreement(name: str) -> dict[str, float]:
    """How far jaxlab's and PyTorch's float32 logits and gradients are from PyTorch in float64, from the same
    weights and batch: the relative max difference (the worst parameter's for gradients), for each. A deep
    net's float32 gradients are only good to about 1e-2 on some parameters (ResNet-56: PyTorch's own
    differ from float64 by 3.6% on one conv kernel), so the check is against the float64 result with
    float32's own error as the yardstick, not jaxlab against PyTorch."""
    import jax
    import torch

    model, params, batch_stats = jax_setup(name)
    x, y = batch()
    (_, (logits, _)), grads = jax.value_and_grad(
        lambda p: jax_loss(model, p, batch_stats, x, y), has_aux=True)(params)
    flat = {path: np.asarray(v) for path, v in flatten(grads).items()}
    ref_logits, ref_grads = torch_logits_and_grads(name, params, x, y, torch.float64)
    t_logits, t_grads = torch_logits_and_grads(name, params, x, y, torch.float32)
    if set(flat) != set(ref_grads):
        raise RuntimeError(f"parameter trees differ: {sorted(set(flat) ^ set(ref_grads))}")

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    return {"logits": rel(logits, ref_logits), "grads": max(rel(flat[k], ref_grads[k]) for k in flat),
            "torch_logits": rel(t_logits, ref_logits),
            "torch_grads": max(rel(t_grads[k], ref_grads[k]) for k in flat)}


def agrees(agree: dict[str, float]) -> bool:
    """jaxlab's float32 errors within AGREE_ATOL or twice PyTorch float32's own, whichever is larger."""
    return all(agree[k] <= max(AGREE_ATOL, 2 * agree[f"torch_{k}"]) for k in ("logits", "grads"))


def timed_in_subprocess(framework: str, name: str, devices: int = 1) -> list[float]:
    out = subprocess.run([sys.executable, "-m", "jaxlab.torch_bench", "--worker", framework, "--model", name,
                          "--devices", str(devices)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} worker for {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def section_name() -> str:
    from jaxlab import benchmarking as bm

    return f"torch-{bm.platform_name()}"


def run(quick: bool = False, write: bool = True) -> str | None:
    """Agreement check, then alternate timed processes; print the table and (write) update BENCHMARKS.md."""
    if importlib.util.find_spec("torch") is None:
        print(INSTALL_HINT)
        return None
    import torch

    from jaxlab import benchmarking as bm

    names = ["resnet20"] if quick else list(MODELS)
    rounds = 1 if quick else ROUNDS
    rows, checks = [], []
    for name in names:
        agree = agreement(name)
        if not agrees(agree):
            raise RuntimeError(f"{name}: jaxlab and PyTorch disagree ({agree}); not timing different maths")
        torch_label = f"PyTorch {torch.__version__}"
        settings = {"jaxlab, 1 CPU device": ("jax", 1),
                    f"jaxlab --cpu-devices {BENCH_CPU_DEVICES}": ("jax", BENCH_CPU_DEVICES),
                    torch_label: ("torch", 1)}
        runs: dict[str, list[float]] = {k: [] for k in settings}
        for _ in range(rounds):
            for label, (framework, devices) in settings.items():
                runs[label] += timed_in_subprocess(framework, name, devices)
                print(f"  {name} {label}: {statistics.median(runs[label]):.1f} ms/step so far", flush=True)
        torch_ms = statistics.median(runs[torch_label])
        for label, ms in runs.items():
            med = statistics.median(ms)
            rows.append([name, label, BATCH, f"{med:.1f}", f"{min(ms):.1f}-{max(ms):.1f}", f"{med / torch_ms:.2f}"])
        checks.append([name, f"{agree['logits']:.1e}", f"{agree['torch_logits']:.1e}", f"{agree['grads']:.1e}",
                       f"{agree['torch_grads']:.1e}"])
    table = bm.markdown_table(["model (option A)", "run", "batch", "ms/step (median)", "range", "/ PyTorch"], rows)
    table += ("\n\nFloat32 results against PyTorch in float64 (relative max difference; gradients: the worst "
              "parameter):\n\n")
    table += bm.markdown_table(["model", "jaxlab logits", "PyTorch f32 logits", "jaxlab grads", "PyTorch f32 grads"],
                               checks)
    body = (f"### Conv-net train step against PyTorch ({bm.platform_name()})\n\n"
            f"{bm.environment_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"{rounds} round(s) of one fresh process per run, alternating, x {REPS} timings x "
            f"{STEPS_PER_REP} steps each; "
            f"SGD momentum {MOMENTUM}, lr {LR}, float32\n\n{table}\n")
    print(body)
    if write:
        bm.write_section(section_name(), body)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, one round of the three runs")
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=tuple(MODELS), default="resnet20", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        ms = time_jax(args.model, args.devices) if args.worker == "jax" else time_torch(args.model)
        print(json.dumps({"ms": ms}))
        return 0
    run(quick=args.quick, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
