"""FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): FL (FedAvg) and vanilla SplitNN as methods of
the one trainer (task.py: `jaxlab train --config fl_vs_splitnn:tiny --config.fl.paradigm=splitnn`), and
the paper's comparison (report.py: `jaxlab report --config fl_vs_splitnn:tiny`)."""

from jaxlab.methods.fl_vs_splitnn.report import (  # noqa: F401
    check_findings,
    format_report,
    plot_report,
    report,
    run_seeds,
)
from jaxlab.methods.fl_vs_splitnn.task import (  # noqa: F401
    build,
    fl_loss_fn,
    forward,
    get_models,
    init_variables,
    load_images,
    split_fns,
)
