"""The `jaxlab bench federated` round against Flower's simulation engine (issue #20, item 2).

The same 100-client FedAvg round as jaxlab.federated.bench (ECGSplitCNN, each client 1 local epoch of
10 SGD steps on batches of 32, lr 0.05, FedAvg weighted by examples held), run two ways from the same
start (bench.setup's params and per-client data slices):
- jaxlab: the jitted vmapped round, fedavg.build(...).round (chunk 4, the bench's fastest);
- Flower (flwr >= 1.20, legacy NumPyClient / ClientApp + ServerApp with flwr.server.strategy.FedAvg,
  fraction_fit=1.0 over all 100 clients, no evaluation) in run_simulation with the ray backend on the
  machine's CPUs, one CPU per client actor. Each client's fit is `client_fit`: the engine's own
  per-client function (fedavg's client_update, a lax.scan over the local steps, jitted once per actor
  process) on that client's slice, returning w_g + delta as a list of numpy arrays.
Flower's round time is from its strategy's configure_fit to the end of its aggregate_fit (the server's
wall time for a round); start-up (ray, actors, the first message) is reported separately, and round 1
(which compiles client_fit in each actor) apart from the later rounds. The aggregate after round 1 must
equal jaxlab's round from the same start within AGREE_ATOL (Flower averages weights, jaxlab averages
deltas and adds them: float32 rounding of 100-term sums differs).

flwr is an optional extra (`pip install 'jaxlab[flower]'`), in a separate environment: flwr[simulation]
pulls ray and protobuf 6, which breaks tensorflow-datasets in jaxlab's main environment (INSTALL_HINT
has the commands; the bench needs only jax, flax, optax and numpy besides flwr). This
module imports flwr only inside the functions that run Flower; the rest (client_fit, the data file) runs
without it. Run alone: `python -m jaxlab.federated.flower_bench [--quick] [--no-write]` (writes only its
block inside the federated section of BENCHMARKS.md); `jaxlab bench federated` includes it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import optax

from jaxlab import benchmarking as bm
from jaxlab.federated import bench as FB
from jaxlab.federated import clients as C
from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg

NUM_CLIENTS, SEED, CHUNK = 100, 0, 4
AGREE_ATOL = 1e-5  # max |w_flower - w_jaxlab| over all params after one round (params are O(0.1))
INSTALL_HINT = ("Flower comparison skipped: flwr is not installed here. Install it in a separate environment "
                "(flwr[simulation] pins protobuf 6, which breaks tensorflow-datasets here): pip install "
                "'jaxlab[flower]' there, or from this checkout: python3.11 -m venv flwr-venv && flwr-venv/bin/pip "
                "install 'flwr[simulation]>=1.20' 'jax>=0.10,<0.13' 'flax>=0.11,<0.13' 'optax>=0.2.5,<0.3' && "
                "flwr-venv/bin/pip install --no-deps -e . && flwr-venv/bin/jaxlab bench federated")


def section_name() -> str:
    """The BENCHMARKS.md block of the Flower rows, nested inside the federated-<platform> section."""
    return f"federated-flower-{bm.platform_name()}"


def flower_available() -> bool:
    """Whether flwr and ray (its simulation extra) are importable here."""
    return all(importlib.util.find_spec(m) is not None for m in ("flwr", "ray"))


# --- the client side, flwr-free ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRuntime:
    """What a Flower client process holds: fit(leaves, data, rng) -> new leaves (jitted), every client's
    data (ClientData [K, S, B, ...], numpy) and the params' treedef (leaves travel as Flower's NDArrays)."""

    fit: Callable
    data: C.ClientData
    treedef: object


def make_fit(loss_fn, treedef, lr: float = FB.LR):
    """fit(leaves, client_data, rng) -> leaves of w_g + delta_k: fedavg's per-client function
    (client_update: local SGD steps in a scan; the one jaxlab's round vmaps) on one client, jitted."""
    alg = fedavg.build(loss_fn, optax.sgd(lr))
    empty = {"params": {}, "model_state": {}}

    @jax.jit
    def fit(leaves, data, rng):
        w = jax.tree_util.tree_unflatten(treedef, leaves)
        _, out = alg.client_update({"params": w, "model_state": {}}, empty, data, rng)
        return jax.tree_util.tree_leaves(B.tree_add(w, out.update["params"]))

    return fit


def client_fit(rt: ClientRuntime, parameters: list[np.ndarray], k: int, server_round: int):
    """Flower's NumPyClient.fit body for client k in round server_round (1-based): (new parameters as a
    list of numpy arrays in tree_leaves order, number of examples k holds). The client's rng is the one
    jaxlab's round r = server_round - 1 gives it (clients.client_rng(SEED, r, k))."""
    data = jax.tree_util.tree_map(lambda x: x[k], rt.data)
    leaves = rt.fit([np.asarray(p) for p in parameters], data, C.client_rng(SEED, server_round - 1, k))
    return [np.asarray(x) for x in leaves], int(rt.data.num_samples[k])


def save_clients(path: Path | str, data: C.ClientData) -> None:
    """Writes every client's data to one .npz that Flower's client processes load (load_runtime)."""
    np.savez(path, step_mask=np.asarray(data.step_mask), num_samples=np.asarray(data.num_samples),
             **{f"batch_{k}": np.asarray(v) for k, v in data.batches.items()})


@functools.cache
def load_runtime(path: str, conv_impl: str = "im2col") -> ClientRuntime:
    """The ClientRuntime of a data file from save_clients, built once per process (the model's treedef
    from bench.model_and_loss, the same model and loss as the jaxlab round)."""
    built = {}

    def params_only():
        params, built["loss_fn"] = FB.model_and_loss(SEED, conv_impl)
        return params

    treedef = jax.tree_util.tree_structure(jax.eval_shape(params_only))  # shapes only: no init to compile
    with np.load(path) as f:
        batches = {k[len("batch_"):]: f[k] for k in f.files if k.startswith("batch_")}
        data = C.ClientData(batches, f["step_mask"], f["num_samples"])
    return ClientRuntime(make_fit(built["loss_fn"], treedef), data, treedef)


def weighted_average(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg of client weights as Flower's strategy computes it: sum_k n_k w_k / sum_k n_k, per array."""
    total = sum(n for _, n in results)
    return [sum(w[i] * (n / total) for w, n in results) for i in range(len(results[0][0]))]


# --- Flower -----------------------------------------------------------------------------------------------


@dataclass
class RoundLog:
    """Wall-clock marks of Flower's rounds (perf_counter), the round-1 aggregate and failure counts."""

    starts: dict[int, float] = field(default_factory=dict)
    ends: dict[int, float] = field(default_factory=dict)
    results: dict[int, int] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    first_fit: dict[int, float] = field(default_factory=dict)  # time.time() of the round's first client fit
    fit_s: dict[int, float] = field(default_factory=dict)  # the clients' fit time summed over clients
    driver_cpu: dict[int, float] = field(default_factory=dict)  # this process's CPU s during the round
    actor_cpu: dict[int, dict[int, float]] = field(default_factory=dict)  # round -> {pid: CPU s since start}
    first_aggregate: list[np.ndarray] | None = None

    def round_s(self) -> dict[int, float]:
        return {r: self.ends[r] - self.starts[r] for r in sorted(self.ends)}

    def cpu_s(self, r: int) -> float:
        """CPU seconds of round r >= 2: this process (server, simulation engine, ray driver) during the
        round plus each client actor's CPU since its last fit of round r - 1 (ray's own daemons excluded)."""
        prev = self.actor_cpu[r - 1]
        return self.driver_cpu[r] + sum(c - prev.get(pid, 0.0) for pid, c in self.actor_cpu[r].items())


def _client_app(path: str):
    """A ClientApp whose NumPyClient.fit runs client_fit on the client's partition id."""
    from flwr.client import ClientApp, NumPyClient

    class JaxClient(NumPyClient):
        def __init__(self, k: int):
            self.k = k

        def fit(self, parameters, config):
            start, t0 = time.time(), time.perf_counter()  # time.time: comparable across processes
            new, n = client_fit(load_runtime(path), parameters, self.k, int(config["server_round"]))
            return new, n, {"fit_start": start, "fit_s": time.perf_counter() - t0, "pid": os.getpid(),
                            "cpu_total": time.process_time()}

    def client_fn(context):
        return JaxClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def _server_app(initial: list[np.ndarray], num_clients: int, rounds: int, log: RoundLog):
    """A ServerApp running FedAvg over all num_clients each round (no evaluation), logging into log."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            log.starts[server_round], log.driver_cpu[server_round] = time.perf_counter(), time.process_time()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            log.ends[server_round] = time.perf_counter()
            log.driver_cpu[server_round] = time.process_time() - log.driver_cpu[server_round]
            log.results[server_round], log.failures[server_round] = len(results), len(failures)
            if results:
                log.first_fit[server_round] = min(float(r.metrics["fit_start"]) for _, r in results)
                log.fit_s[server_round] = sum(float(r.metrics["fit_s"]) for _, r in results)
                cpu = log.actor_cpu.setdefault(server_round, {})
                for _, r in results:
                    pid = int(r.metrics["pid"])
                    cpu[pid] = max(cpu.get(pid, 0.0), float(r.metrics["cpu_total"]))
            if server_round == 1 and out[0] is not None:
                log.first_aggregate = parameters_to_ndarrays(out[0])
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients, min_evaluate_clients=0,
        min_available_clients=num_clients, accept_failures=False,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda r: {"server_round": r},
    )
    return ServerApp(server_fn=lambda context: ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=rounds)))


def _importable_in_workers() -> None:
    """Puts this checkout's root on PYTHONPATH so ray's worker processes import the same jaxlab."""
    root = str(Path(__file__).resolve().parents[2])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def run_flower(path: str, initial: list[np.ndarray], rounds: int, num_clients: int = NUM_CLIENTS,
               cpus: int | None = None) -> tuple[RoundLog, float]:
    """Runs `rounds` FedAvg rounds in Flower's simulation engine (ray backend, one CPU per client
    actor, cpus = os.cpu_count() in all). Returns (the round log, start-up: seconds from the call to the
    first client fit, which waits for ray, its actors and their imports)."""
    from flwr.simulation import run_simulation

    _importable_in_workers()
    cpus = cpus or os.cpu_count() or 1
    log = RoundLog()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False}}
    t0 = time.time()
    run_simulation(server_app=_server_app(initial, num_clients, rounds, log), client_app=_client_app(path),
                   num_supernodes=num_clients, backend_name="ray", backend_config=backend)
    if len(log.ends) != rounds or any(log.failures.values()) or log.first_aggregate is None:
        raise RuntimeError(f"Flower's simulation did not complete {rounds} rounds without failures: rounds "
                           f"done {sorted(log.ends)}, results {log.results}, failures {log.failures} (see "
                           "Flower's log above)")
    return log, log.first_fit[1] - t0


# --- the comparison ---------------------------------------------------------------------------------------


def _versions() -> str:
    return ", ".join(f"{m} {importlib.metadata.version(m)}" for m in ("flwr", "ray"))


def time_jaxlab(alg, params, data, iters: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """jaxlab's jitted round from params (all clients): (round-1 params leaves, bm.time_fn's wall times
    plus "cpu_s", this process's median CPU seconds per round; compile_s: the first call's)."""
    step, cpu = jax.jit(alg.round), []

    def timed_round(*args):
        c0 = time.process_time()
        out = jax.block_until_ready(step(*args)[0].params)
        cpu.append(time.process_time() - c0)
        return out

    args = [FB._round_args(alg, params, data, NUM_CLIENTS, r) for r in range(3)]
    t0 = time.perf_counter()
    ref = [np.asarray(x) for x in jax.tree_util.tree_leaves(timed_round(*args[0]))]
    compile_s = time.perf_counter() - t0
    r = bm.time_fn(timed_round, args, warmup=1, iters=iters)
    return ref, {**r, "compile_s": compile_s, "cpu_s": statistics.median(cpu[-iters:])}


def compare(quick: bool = False) -> tuple[str, dict[str, float]]:
    """Times jaxlab's vmapped round and Flower's round on the same 100 clients, checks that their
    round-1 aggregates agree; returns (the markdown block, numbers)."""
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    params, loss_fn, data = FB.setup(NUM_CLIENTS)
    alg = fedavg.build(loss_fn, optax.sgd(FB.LR), chunk_size=CHUNK)
    ref, jl = time_jaxlab(alg, params, data, 3 if quick else 5)
    rounds = 3 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "clients.npz")
        save_clients(path, data)
        initial = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
        log, startup = run_flower(path, initial, rounds)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(log.first_aggregate, ref))
    moved = max(float(np.max(np.abs(b - a))) for a, b in zip(initial, ref))
    per_round = log.round_s()
    later = [per_round[r] for r in per_round if r > 1]
    t = {"jaxlab_median_s": jl["median_s"], "jaxlab_min_s": jl["min_s"], "flower_median_s": statistics.median(later),
         "flower_min_s": min(later), "flower_round1_s": per_round[1], "flower_startup_s": startup,
         "flower_fit_s": statistics.median(log.fit_s[r] for r in per_round if r > 1),
         "jaxlab_cpu_s": jl["cpu_s"],
         "flower_cpu_s": statistics.median(log.cpu_s(r) for r in per_round if r > 1),
         "max_abs_diff": diff, "max_abs_update": moved, "load_start": load_start}
    t["ratio_median"] = t["flower_median_s"] / t["jaxlab_median_s"]
    t["ratio_min"] = t["flower_min_s"] / t["jaxlab_min_s"]
    t["ratio_cpu"] = t["flower_cpu_s"] / t["jaxlab_cpu_s"]
    t["flower_overhead_s"] = t["flower_median_s"] - t["flower_fit_s"] / (os.cpu_count() or 1)
    return _block(t, jl["compile_s"], len(later)), t


def _block(t: dict[str, float], compile_s: float, timed: int) -> str:
    cpus = os.cpu_count()
    rows = [
        [f"jaxlab vmapped round (jit, chunk {CHUNK})", t["jaxlab_median_s"], t["jaxlab_min_s"], t["jaxlab_cpu_s"],
         compile_s, None, None],
        [f"Flower simulation, {NUM_CLIENTS} clients (ray, {cpus} client actors)", t["flower_median_s"],
         t["flower_min_s"], t["flower_cpu_s"], t["flower_round1_s"], t["flower_startup_s"], t["flower_fit_s"]],
    ]
    table = bm.markdown_table(
        [f"{NUM_CLIENTS} clients, 1 FedAvg round", "round s (median)", "round s (min)", "CPU s per round (median)",
         "first round s (compile; Flower: + start-up)", "start-up s (to first client fit)",
         "clients' fit s per round (sum)"], rows)
    verdict = "met" if t["ratio_median"] >= 10 else "NOT met"
    agree = "agree" if t["max_abs_diff"] <= AGREE_ATOL else "DISAGREE"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return "\n".join([
        "#### Against Flower's simulation engine",
        "",
        f"{bm.environment_line()}; {_versions()}",
        "",
        "The same round in Flower: a NumPyClient per client whose fit runs the engine's per-client function "
        "(client_update, jitted once per actor process) on the same data slice; flwr.server.strategy.FedAvg "
        f"over all {NUM_CLIENTS} clients (fraction_fit 1.0), no evaluation; run_simulation, ray backend, 1 CPU "
        f"per client actor. Flower's round: configure_fit to the end of aggregate_fit, median of rounds 2-"
        f"{timed + 1}; round 1 also waits for ray's start-up and compiles the client function in each actor "
        "(start-up: from run_simulation's call to the first client fit). The clients' fit time (inside "
        "NumPyClient.fit, summed over clients and spread over the actors) is the part of Flower's round "
        "spent in JAX. CPU s: jaxlab's process during a round; Flower's driver process (server, simulation "
        "engine, ray driver) plus its client actors (ray's daemons not counted), a load-robust measure of "
        "the work each does on the shared cores.",
        "",
        table,
        "",
        f"Ratio Flower / jaxlab per round: {t['ratio_median']:.1f}x (medians), {t['ratio_min']:.1f}x (mins); "
        f"CPU time per round: {t['ratio_cpu']:.1f}x. "
        f"Target (jaxlab's round >= 10x faster): {verdict}. Same computation: after round 1 the two aggregates "
        f"{agree}, max |difference| {t['max_abs_diff']:.2g} (tolerance {AGREE_ATOL:g}; the round moved the "
        f"params by up to {t['max_abs_update']:.2g}). Flower's round beyond its clients' JAX time (median round - "
        f"fit sum / {cpus} actors): {t['flower_overhead_s']:.2f} s, "
        f"{t['flower_overhead_s'] / NUM_CLIENTS * 1e3:.0f} ms per client. Load average: {t['load_start']:.1f} "
        f"at the start, {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end, on {cpus} "
        + ("cores: the machine was shared with other jobs, timings are noisy."
           if max(t["load_start"], load[0]) > cpus else "cores: an otherwise idle machine."),
    ])


def block(quick: bool) -> str:
    """The Flower block for the federated section, with its markers: measured here when flwr is importable; otherwise the
    block of the last run that had flwr (kept from BENCHMARKS.md, with its own date) and INSTALL_HINT."""
    if flower_available():
        return wrapped(compare(quick)[0])
    print(INSTALL_HINT)
    old = previous_block()
    return INSTALL_HINT + ("" if old is None else " Below: the last run with flwr (its date line).\n\n" + old)


def previous_block(path: Path | str | None = None) -> str | None:
    """The Flower block in BENCHMARKS.md with its markers, or None."""
    path = Path(path) if path is not None else bm.BENCHMARKS_FILE
    if not path.exists():
        return None
    text, name = path.read_text(), section_name()
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    i, j = text.find(begin), text.find(end)
    return text[i: j + len(end)] if 0 <= i < j else None


def wrapped(body: str) -> str:
    """body between this block's markers, so bm.write_section(section_name(), ...) can replace it alone."""
    return f"<!-- begin:{section_name()} -->\n{body.rstrip()}\n<!-- end:{section_name()} -->"


def write_block(body: str, path: Path | str | None = None) -> Path:
    """Writes the Flower block alone: in place where BENCHMARKS.md has it, else at the end of the
    federated-<platform> section (so a full `jaxlab bench federated` run rewrites it with its section),
    else as a section of its own."""
    path = Path(path) if path is not None else bm.BENCHMARKS_FILE
    end = f"<!-- end:federated-{bm.platform_name()} -->"
    text = path.read_text() if path.exists() else ""
    if previous_block(path) is None and end in text:
        path.write_text(text.replace(end, "\n" + wrapped(body) + "\n" + end, 1))
        return path
    return bm.write_section(section_name(), body, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxlab.federated.flower_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 Flower rounds instead of 5")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = p.parse_args(argv)
    if not flower_available():
        print(INSTALL_HINT)
        return 1
    body = compare(args.quick)[0]
    print(body)
    if not args.no_write:
        write_block(body)
    return 0


if __name__ == "__main__":
    # run the imported module's main: ray pickles the client app's functions by module name, and
    # __main__ is not a module the actors can import
    from jaxlab.federated.flower_bench import main as _main

    raise SystemExit(_main())
