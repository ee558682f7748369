"""jaxlab.federated: the client axis.

clients      stacked client data, the vmapped/chunked/sharded client half of a round (run_clients)
algorithms/  one module per algorithm on a shared shape (base): fedavg (FedAvg, FedAvgM, FedAdam,
             FedProx), scaffold, fedbn; a round is a pure train_step(state, RoundBatch, rng)
aggregators  overflow-safe weighted mean, median, trimmed mean, per-client norm bound
split        SplitNN / SplitFed V1, V2 and byte formulas; chain: N-part split chains
dp, privacy, leakage, partition: DP-SGD and its accountant, Laplace on activations, leakage metrics,
             client partitioners
"""
