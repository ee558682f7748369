"""PLwF continual learning (Feng et al., arXiv 2211.15215; jaxlab.methods.plwf) and its baselines.

    jaxlab train  --config plwf:tiny                              # PLwF, split digits, task-incremental
    jaxlab train  --config plwf:tiny --config.cl.method=ewc --config.cl.protocol=class
    jaxlab report --config plwf:tiny                              # methods x protocols x seeds 0, 1, 2

cl.method: finetune | lwf | plwf | ewc | joint; cl.protocol: task (task-incremental: the task's head) |
class (class-incremental: one classifier over every seen class); cl.credit: global | per_layer | sum.
cl.class_ce (class protocol): current (default: the new-task cross-entropy over the task's own head, as
FACIL trains; only the evaluation is task-agnostic) | seen (over every seen class, as Avalanche and van de
Ven et al.; on split digits every method but joint then forgets the old tasks completely). Joint
training, the upper bound, always trains one classifier over every seen class under the class protocol.

Variants:
  tiny              CPU minutes: the real scikit-learn digits (1,437 train / 360 test, 8x8) split into
                    5 tasks x 2 classes, an MLP 64-100-100 with a 2-way head per task, Adam 5e-3,
                    batch 32, 100 steps a task (~11 epochs).
  cifar100_10       split CIFAR-100, 10 tasks x 10 classes; tfds:cifar100 prepared under data.data_dir
  cifar100_20       split CIFAR-100, 20 tasks x 5 classes      (or --config.data.source=file:/path/c100.npz)
  tinyimagenet      TinyImageNet 64x64, 10 tasks x 20 classes from your files:
                    --config.data.source=file:/path/tinyimagenet.npz (image (N, 64, 64, 3) uint8, label (N,);
                    or tinyimagenet_train.npz / _test.npz) or folder:/path/tiny-imagenet-200/train;
                    a subset: --config.cl.num_tasks=5 (the first 100 classes).
  Paper-scale variants use FACIL's ResNet-32 (CIFAR) and common settings (Adam 1e-3, batch 64,
  ~30 epochs a task, random crop + flip: cl.augment), not the paper's (unknown); run them on an accelerator.
"""

from jaxlab.config import Config, base_config, parse_arg

VARIANTS = ("tiny", "cifar100_10", "cifar100_20", "tinyimagenet")
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPORT_METHODS = ("finetune", "ewc", "lwf", "plwf", "plwf_sum", "plwf_per_layer", "joint")


def get_config(arg=None):
    arg = parse_arg(arg, VARIANTS, variant="tiny")
    c = base_config()
    c.method = "plwf"
    c.cl = Config(
        method="plwf", protocol="task", class_ce="current", num_tasks=5, classes_per_task=2, num_classes=0, class_order_seed=-1,
        steps_per_task=100, lamb=1.0, temperature=2.0, distill_latest=False, credit="global", project="new",
        ewc_lambda=100.0, fisher="expected", fisher_batches=0, image_key="image", label_key="label", augment=False,
    )
    c.model.update(backbone="mlp", widths=(100, 100), blocks_per_stage=5, conv_impl="lax")
    c.data.update(source="shipped:digits", batch_size=32, eval_batch_size=360, image_scale=1.0, mean=(), std=())
    c.optimizer.update(name="adam", lr=1e-3)
    c.report = Config(methods=REPORT_METHODS, protocols=("task", "class"), seeds=(0, 1, 2))

    if arg.variant == "tiny":
        c.optimizer.lr = 5e-3  # 1e-3 leaves fine-tuning's forgetting on split digits near one test example
        c.train.update(log_every=50, eval_every=100_000, checkpoint_every=100_000, keep_checkpoints=1)
    else:
        c.model.update(backbone="resnet", blocks_per_stage=5, conv_impl="lax")
        c.cl.augment = True  # random crop (pad 4) and horizontal flip, as CIFAR continual-learning code does
        c.data.update(batch_size=64, eval_batch_size=512, image_scale=255.0)
        if arg.variant.startswith("cifar100"):
            tasks = 10 if arg.variant == "cifar100_10" else 20
            c.cl.update(num_tasks=tasks, classes_per_task=100 // tasks, steps_per_task=30 * 50_000 // tasks // 64)
            c.data.update(source="tfds:cifar100", data_dir="~/tensorflow_datasets", mean=CIFAR100_MEAN,
                          std=CIFAR100_STD)
        else:
            c.cl.update(num_tasks=10, classes_per_task=20, steps_per_task=30 * 10_000 // 64)
            c.data.update(source="file:tinyimagenet.npz", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        c.report.seeds = (0, 1, 2)
        c.train.update(log_every=100, eval_every=100_000, checkpoint_every=1000)
    c.train.update(steps=c.cl.num_tasks * c.cl.steps_per_task, progress=False, async_checkpoints=False)
    return c
