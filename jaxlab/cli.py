"""jaxlab train | eval | list | info | bench.

    jaxlab train --config configs/ecg_cnn.py:tiny --config.optimizer.lr=3e-4 --workdir runs/ecg
    jaxlab eval  --config ecg_cnn:tiny --workdir runs/ecg [--which best]
    jaxlab list
    jaxlab info  --config ecg_cnn:tiny [--json]
    jaxlab bench --config ecg_cnn:tiny        (train step)      jaxlab bench kernels | federated | ct [--quick]
    jaxlab report --config split_ecg:tiny     (a method's paper experiment: tables, plots, trend checks)
    jaxlab convert videomae_b.pth weights.npz (a PyTorch VideoMAE / MAR state dict -> .npz for train.init_from)
    jaxlab convert swin_tiny_patch4_window7_224.pth swin_t.npz --kind swin (for model.pretrained)
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from jaxlab.config import CONFIGS_DIR, DEFAULT_CONFIG, ConfigError, load_config, resolve_config_path
from jaxlab.convert import KINDS as CONVERT_KINDS
from jaxlab.errors import UsageError, UserError, exit_code

NO_COMPILE_CACHE = "--no-compile-cache"  # jaxlab.compile_cache: on by default, per-user folder
ALLOW_CONFIG_CHANGE = "--allow-config-change"  # jaxlab.train.workdir.OVERRIDE_FLAG
CPU_DEVICES = "--cpu-devices"  # use_cpu_devices: the host CPU as N XLA devices
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
BENCHES = {  # `jaxlab bench <what>`: modules with run(quick, write) (a method's own bench is found by name)
    "kernels": ("jaxlab.kernels.masked_attention.bench", "jaxlab.kernels.window_attention.bench"),
    "federated": ("jaxlab.federated.bench",),
    "ct": ("jaxlab.ct.bench",),
    "torch": ("jaxlab.torch_bench",),
}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pulls `--config.a.b=value` (or `--config.a.b value`) out of argv."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key = arg[len("--config."):]
            if "=" not in key:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                key, i = f"{key}={argv[i + 1]}", i + 1
            overrides.append(key)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def use_cpu_devices(n: int) -> None:
    """Runs this process's XLA CPU backend as `n` devices (XLA_FLAGS' host device count, replacing any
    count already there), so the trainer's data mesh (mesh.data=-1: every device) splits each batch over
    them; GSPMD keeps the maths of the whole batch (BatchNorm statistics included) to float rounding.
    On a few cores this runs the per-device programs concurrently where XLA:CPU would run one operation at
    a time on one core (its convolutions at CIFAR sizes stay single-threaded): BENCHMARKS.md has the
    measurements. Must run before JAX starts its CPU backend; a UsageError says so otherwise."""
    if n < 1:
        raise UsageError(f"{CPU_DEVICES} must be a positive number of devices, got {n}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(HOST_DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{HOST_DEVICE_FLAG}={n}"])
    import jax

    got = len(jax.devices("cpu"))
    if got != n:
        raise UsageError(f"{CPU_DEVICES} {n}: JAX's CPU backend had already started in this process with "
                         f"{got} device(s); give the flag to a fresh jaxlab process")


def _pop_cpu_devices(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N, argv without it) for `--cpu-devices N` or `--cpu-devices=N` anywhere in argv; (None, argv) if absent."""
    for i, arg in enumerate(argv):
        if arg == CPU_DEVICES or arg.startswith(CPU_DEVICES + "="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value.isdigit():
                raise UsageError(f"{CPU_DEVICES} needs a positive integer, got {value!r}")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            return int(value), rest
    return None, argv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the full traceback (may also follow the command)")
    p.add_argument(NO_COMPILE_CACHE, action="store_true",
                   help="do not read or write JAX's persistent compilation cache (default: on, in "
                        "$JAXLAB_COMPILE_CACHE or ~/.cache/jaxlab/xla; may also follow the command)")
    p.add_argument(CPU_DEVICES, type=int, metavar="N",
                   help="run the CPU as N XLA devices and split each batch over them (mesh.data=-1; faster "
                        "conv nets on a few cores, see BENCHMARKS.md; may also follow the command)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", default=DEFAULT_CONFIG,
                        help="configs/<name>.py[:variant] or <name>[:variant] (default %(default)s)")
        return sp

    t = with_config(sub.add_parser("train", help="train (or resume) an experiment"))
    t.add_argument("--workdir", default=None, help="run folder (default runs/<config>-<variant>)")
    t.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    t.add_argument("--num-processes", type=int, default=None)
    t.add_argument("--process-id", type=int, default=None)
    t.add_argument(ALLOW_CONFIG_CHANGE, action="store_true",
                   help="resume although model/data keys differ from the workdir's config.json")
    e = with_config(sub.add_parser("eval", help="evaluate a checkpoint"))
    e.add_argument("--workdir", default=None)
    e.add_argument("--which", choices=("latest", "best"), default="latest")
    e.add_argument(ALLOW_CONFIG_CHANGE, action="store_true",
                   help="evaluate although model/data keys differ from the workdir's config.json")
    sub.add_parser("list", help="methods, configs and data sources")
    i = with_config(sub.add_parser("info", help="model summary: parameters, input shapes, FLOPs"))
    i.add_argument("--json", action="store_true")
    r = with_config(sub.add_parser("report", help="run a method's paper experiment and write its report"))
    r.add_argument("--workdir", default=None)
    c = sub.add_parser("convert", help="turn a PyTorch checkpoint into an .npz that train.init_from loads")
    c.add_argument("source", help="checkpoint.pth (needs torch) or a state dict saved as .npz")
    c.add_argument("dest", help="output .npz")
    c.add_argument("--kind", choices=sorted(CONVERT_KINDS), default="videomae",
                   help="whose state dict: videomae (VideoMAE / MAR ViTs), swin (ImageNet Swin, for SwinDRNet's streams) (default %(default)s)")
    b = with_config(sub.add_parser("bench", help="bench a config's train step, or `bench kernels | federated | ct`"))
    b.add_argument("what", nargs="?", default="train",
                   help="train (default: a config's train step), kernels, federated, ct, or a method with a "
                        "bench of its own (mar: compute per clip)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions / smaller shapes")
    b.add_argument("--steps", type=int, default=50, help="timed train steps")
    b.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p


def require_run(workdir: Path) -> None:
    """Refuses (creating nothing) a workdir that holds no run: missing, or without checkpoints/."""
    if not workdir.is_dir():
        raise UsageError(f"workdir {str(workdir)!r} does not exist: train into it first (jaxlab train "
                         "--config ... --workdir ...) or pass the --workdir of a run")
    if not (workdir / "checkpoints").is_dir():
        raise UsageError(f"workdir {str(workdir)!r} holds no checkpoints/ folder: it is not a jaxlab run, "
                         "or its training has not saved a checkpoint yet")


def default_workdir(spec: str) -> Path:
    path, arg = resolve_config_path(spec)
    return Path("runs") / (path.stem + (f"-{arg.replace(',', '_').replace('=', '')}" if arg else ""))


def cmd_train(args, overrides) -> int:
    from jaxlab.train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    config = load_config(args.config, overrides)
    from jaxlab import methods
    from jaxlab.train.loop import train

    workdir = Path(args.workdir) if args.workdir else default_workdir(args.config)
    print(f"[jaxlab] training {args.config} in {workdir}", flush=True)
    train(config, workdir, methods.build(config), allow_config_change=args.allow_config_change)
    return 0


def cmd_eval(args, overrides) -> int:
    config = load_config(args.config, overrides)
    from jaxlab import methods
    from jaxlab.train.loop import evaluate

    workdir = Path(args.workdir) if args.workdir else default_workdir(args.config)
    require_run(workdir)
    metrics = evaluate(config, workdir, methods.build(config), args.which,
                       allow_config_change=args.allow_config_change)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_report(args, overrides) -> int:
    from jaxlab import methods

    config = load_config(args.config, overrides)
    module = methods.module(config.method)
    if not hasattr(module, "report"):
        raise ConfigError(f"method {config.method!r} has no report; methods with one: "
                          + ", ".join(m for m in methods.names() if hasattr(methods.module(m), "report")))
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.config).with_name(
        default_workdir(args.config).name + "-report")
    module.report(config, workdir)
    return 0


def cmd_list(args, overrides) -> int:
    from jaxlab.data.sources import available
    from jaxlab import methods

    print("methods:  " + ", ".join(methods.names()))
    print("configs (name: first docstring line; variants in the file):")
    for path in sorted(CONFIGS_DIR.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"jaxlab_cfg_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        doc = (module.__doc__ or "").strip().splitlines()
        print(f"  {path.stem}: {doc[0] if doc else ''}")
    print("data sources:")
    for kind, names in available().items():
        print(f"  {kind}:" + ("" if not names else " " + ", ".join(names)))
    return 0


def model_info(config) -> dict:
    """Parameter counts (total and per group: the parts, or a single model's top-level modules), input
    shapes, and FLOPs of the forward pass and of a whole train step of the first stage (forward, backward
    and optimizer update), from XLA's cost analysis of the compiled computations. Per example where the
    batch is a batch of examples (the train step's per device: with N data devices its replicated
    optimizer update is amortised over batch / N examples); per step otherwise (a federated round)."""
    import jax

    from jaxlab import methods
    from jaxlab.benchmarking import compiled_flops
    from jaxlab.train.init_from import flatten
    from jaxlab.train.loop import build_run, step_key
    from jaxlab.train.mesh import DATA
    from jaxlab.train.state import param_count

    method = methods.build(config)
    run = build_run(config, method)
    state = run.enter(0, run.state)
    groups = method.param_groups(state) if method.param_groups else state.params
    batch = run.batches(0).batch(0)
    leaves = flatten(batch)
    train_step = run.train_step(0).lower(state, batch, step_key(config.seed, 0)).compile()
    frozen = {n: param_count(p.params) for n, p in state.parts.items() if p.is_frozen and n in groups}
    info = {
        "config_method": config.method,
        "trainable_parameters": param_count(groups) - sum(frozen.values()),
        "parameters_per_module": {k: param_count(v) for k, v in groups.items()},
        "frozen_modules": sorted(frozen),  # in the first stage (e.g. a guiding network): not trainable
        "stages": [{"name": s.name, "steps": s.steps, "trains": list(s.trains)} for s in run.stages],
    }
    if method.train_batches is not None:  # not a batch of examples: shapes and FLOPs per step
        info["input_shapes"] = {k: list(v.shape) for k, v in leaves.items()}
        info["input_dtypes"] = {k: str(v.dtype) for k, v in leaves.items()}
        info["train_step_flops"] = compiled_flops(train_step)
        return info
    batch_size = next(iter(leaves.values())).shape[0]
    info["input_shapes"] = {k: [None, *v.shape[1:]] for k, v in leaves.items()}
    info["input_dtypes"] = {k: str(v.dtype) for k, v in leaves.items()}
    if method.apply_fn is not None:
        forward = jax.jit(method.apply_fn).lower(state, batch).compile()
        info["forward_flops_per_example"] = compiled_flops(forward) / batch_size
    # the step is partitioned over the mesh's data axis: XLA's cost is one device's share
    info["train_step_flops_per_example"] = compiled_flops(train_step) / (batch_size / run.mesh.shape[DATA])
    return info


def cmd_info(args, overrides) -> int:
    info = model_info(load_config(args.config, overrides))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"method: {info['config_method']}")
    print(f"trainable parameters: {info['trainable_parameters']:,}")
    for name, count in info["parameters_per_module"].items():
        print(f"  {name}: {count:,}" + (" (frozen, not counted above)" if name in info["frozen_modules"] else ""))
    for name, shape in info["input_shapes"].items():
        print(f"input {name}: {shape} {info['input_dtypes'][name]}")
    if len(info["stages"]) > 1:
        for stage in info["stages"]:
            print(f"stage {stage['name']}: {stage['steps']:,} steps, trains {', '.join(stage['trains']) or '-'}")
    if "forward_flops_per_example" in info:
        print(f"forward FLOPs per example (XLA cost analysis): {info['forward_flops_per_example']:,.0f}")
    if "train_step_flops_per_example" in info:
        print(f"train step FLOPs per example (forward + backward + update): "
              f"{info['train_step_flops_per_example']:,.0f}")
    else:
        print(f"train step FLOPs (one step of the first stage): {info['train_step_flops']:,.0f}")
    return 0


def _warm_compile_s(jitted, args) -> float | None:
    """Seconds to compile `jitted` again once the in-memory caches are cleared, i.e. read back from the
    persistent cache as a second process would; None when that was not a persistent-cache hit."""
    import jax

    from jaxlab import compile_cache

    hits = compile_cache.counts()["cache_hits"]
    jax.clear_caches()
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    return seconds if compile_cache.counts()["cache_hits"] > hits else None


def bench_train(spec: str, overrides: list[str], steps: int, write: bool) -> str:
    """Steps/s, examples/s, compile time and peak memory of a config's jitted train step."""
    import jax

    from jaxlab import benchmarking as bm
    from jaxlab import compile_cache, methods
    from jaxlab.train.loop import build_run, step_key

    # a fresh persistent cache for this process: the first compile is cold whatever the user's cache
    # holds, the second (after clearing the in-memory caches) is what a second run pays
    cache_dir = tempfile.mkdtemp(prefix="jaxlab-bench-cache-")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    compile_cache.enable(cache_dir)
    config = load_config(spec, overrides)
    run = build_run(config, methods.build(config))
    t = config.train
    state = run.enter(0, run.state)
    step_fn = run.train_step(0)
    batches = [run.batches(0).batch(i) for i in range(4)]
    misses = compile_cache.counts()["cache_misses"]
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], step_key(0, 0)).compile()
    compile_s = time.perf_counter() - t0
    if compile_cache.counts()["cache_misses"] == misses:  # this process's cache was set up before the bench
        compile_s = "already cached"
    warm_s = _warm_compile_s(step_fn, (state, batches[0], step_key(0, 0)))
    state, _ = compiled(state, batches[0], step_key(0, 0))  # warm-up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)], step_key(0, i))
    jax.block_until_ready((state, metrics))
    per_step = (time.perf_counter() - t0) / steps
    device_peak = bm.peak_device_memory_bytes()
    label = spec + (" " + " ".join(overrides) if overrides else "")
    if jax.default_backend() == "cpu" and jax.device_count() > 1:  # its own section, not the 1-device one
        label += f" {CPU_DEVICES} {jax.device_count()}"
    row = [label, config.data.batch_size, t.compute_dtype,
           1.0 / per_step, config.data.batch_size / per_step, compile_s,
           "not cached" if warm_s is None else warm_s,
           (device_peak or bm.peak_host_memory_bytes()) / 2**20, "device" if device_peak else "host RSS"]
    header = ["config", "batch", "dtype", "steps/s", "examples/s", "compile s (cold)",
              "compile s (warm: from the cache)", "peak MiB", "memory"]
    body = f"### Train step: {label} ({bm.platform_name()})\n\n{bm.environment_line()}; {steps} timed steps\n\n"
    body += bm.markdown_table(header, [row])
    print(body)
    if write:
        bm.write_section(f"train-{label.replace(' ', '-')}-{bm.platform_name()}", body)
    return body


def cmd_bench(args, overrides) -> int:
    write = not args.no_write
    if args.what in BENCHES:
        for name in BENCHES[args.what]:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name is None or not name.startswith(err.name):
                    raise
                print(f"[jaxlab] {name} is not in this checkout; skipped", file=sys.stderr)
                continue
            module.run(quick=args.quick, write=write)
        return 0
    if args.what != "train":
        from jaxlab import methods

        benches = [m for m in methods.names() if hasattr(methods.module(m), "bench")]
        if args.what not in benches:
            raise UsageError(f"bench: unknown {args.what!r}; choose train, {', '.join(BENCHES)}"
                             + "".join(f", {m}" for m in benches))
        methods.module(args.what).bench(quick=args.quick, write=write)
        return 0
    bench_train(args.config, overrides, args.steps, write=write)
    return 0


def cmd_convert(args, overrides) -> int:
    from jaxlab.convert import convert

    arrays = convert(args.kind, args.source, args.dest)
    print(f"wrote {len(arrays)} arrays under {sorted({k.split('/')[0] for k in arrays})} to {args.dest}")
    return 0


COMPILING_COMMANDS = ("train", "eval", "info", "bench", "report")
COMMANDS = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "info": cmd_info, "bench": cmd_bench,
            "report": cmd_report, "convert": cmd_convert}


def _is_user_error(err: BaseException) -> bool:
    # NonFiniteError is the trainer's: a user error by name too, whichever class it derives from
    return isinstance(err, UserError) or type(err).__name__ == "NonFiniteError"


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user error (jaxlab.errors.UserError: a config, data, workdir or checkpoint
    problem, a non-finite loss) ends as `jaxlab: <message>` on stderr and a non-zero exit code (2 for a
    bad command line or config, 1 for a run that failed), its traceback shown only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, no_cache = "--debug" in argv, NO_COMPILE_CACHE in argv
    argv = [a for a in argv if a not in ("--debug", NO_COMPILE_CACHE)]
    try:
        cpu_devices, argv = _pop_cpu_devices(argv)
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        if cpu_devices is not None:
            use_cpu_devices(cpu_devices)
        if args.command in COMPILING_COMMANDS:
            from jaxlab import compile_cache

            compile_cache.setup(disabled=no_cache)
        return COMMANDS[args.command](args, overrides)
    except Exception as err:
        if not _is_user_error(err):
            raise
        if debug:
            traceback.print_exc()
        label = "config error: " if isinstance(err, ConfigError) else ""
        print(f"jaxlab: {label}{err}", file=sys.stderr, flush=True)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
