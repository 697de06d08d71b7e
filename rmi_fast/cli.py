"""`rmi-fast` command line: argument parsing only; every command calls into the library."""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path


# ------------------------------------------------------------------------------------------------------------ info

def _info(args: argparse.Namespace) -> int:
    import torch

    import rmi_fast
    from rmi_fast import backends, memory, tuning

    print(f"rmi_fast {rmi_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}")
    try:
        from rmi_fast import _C

        print(f"compiled module: {_C.__file__} (CUDA kernels built: {bool(_C.with_cuda)})")
        if hasattr(_C, "cpu_isa"):
            print(f"C++ CPU kernels: {_C.cpu_isa()} elementwise passes, tile GEMMs: {_C.cpu_tile_gemm()}")
            print(f"large CPU outputs (2 MiB and more): transparent huge pages, mode {memory.huge_pages()}")
    except ImportError as exc:
        print(f"compiled module: not available ({exc})")
    print("backends:")
    for name, reason in backends.status().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    print("dispatch tables (backend='auto'):")
    for device in ("cpu", *(["cuda"] if torch.cuda.is_available() else [])):
        print(f"  {device:<7} {tuning.describe(device)}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="version, build and every backend with its status")
    p.set_defaults(func=_info)


# ----------------------------------------------------------------------------------------------------------- bench

def _csv(kind: str, choices=None):
    """argparse type: a comma-separated list (of ``choices`` when given)."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            what = "a positive finite float" if kind is float else f"a positive {kind.__name__}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _radius(text: str) -> float:
    from rmi_fast.robust.utils import check_radius

    try:
        return check_radius(_positive(float)(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a radius in (0, 1] (images are in [0, 1]), got {text!r}") from None


def _seed(text: str) -> int:
    from rmi_fast.robust.utils import check_seed

    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}") from None


def _threads(text: str) -> int:
    from rmi_fast.robust.utils import check_threads

    try:
        return check_threads(_positive(int)(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _png(text: str) -> str:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"--plot writes a PNG: the file name must end in .png, got {text!r}")
    return text


def _bench(args: argparse.Namespace) -> int:
    from rmi_fast import bench
    from rmi_fast.bench import report

    if args.markdown:
        report.check_markdown_target(args.markdown)  # before the run, not after it
    if args.from_json:
        result = report.load(args.from_json)
        print(report.table(result))
        if args.markdown:
            report.write_markdown(result, args.markdown)
        if args.plot:
            bench.render_plot(result, args.plot, scaling=str(result.get("suite", "")).endswith("scaling"))
        return 0
    device = _device_arg("bench", args.device)
    if args.quick and device != "cpu":
        raise SystemExit("rmi-fast bench: error: --quick is the short CPU run; use --cases to shorten a GPU run")
    try:
        if args.list:
            print("\n".join(bench.list_cases(device, quick=args.quick, scaling=args.scaling, patterns=args.cases)))
            return 0
        bench.bench(device=device, quick=args.quick, scaling=args.scaling, case_patterns=args.cases,
                    impl_patterns=args.impls, passes=args.passes, repeats=args.repeats, warmup=args.warmup,
                    max_time_s=args.max_time, memory=not args.no_memory, seed=args.seed, json_path=args.json,
                    append=args.append, plot_path=args.plot, markdown_path=args.markdown, command=sys.argv)
    except ValueError as exc:
        raise SystemExit(f"rmi-fast bench: error: {exc}") from None
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time every bound and loss: ours (each backend) against eager, torch.compile and peers",
        description="Times forward, backward and forward+backward of every MI bound and contrastive loss for every "
                    "available rmi_fast backend, eager PyTorch, torch.compile and the peer libraries installed; "
                    "checks each value against ours first. Prints a table; --json writes the rows.")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="the short CPU suite (about a minute)")
    p.add_argument("--scaling", action="store_true",
                   help="time and memory against B and D (use with --plot for the scaling curves)")
    p.add_argument("--cases", type=_csv("case patterns"), metavar="PAT[,PAT...]",
                   help="case-name globs or prefixes, e.g. 'infonce/*' or 'dv/G64*' (see --list)")
    p.add_argument("--impls", type=_csv("implementation patterns"), metavar="PAT[,PAT...]",
                   help="implementation globs, e.g. 'rmi_fast*,eager' (default: all)")
    p.add_argument("--passes", type=_csv("passes", ("fwd", "bwd", "fwd+bwd")), metavar="P[,P...]",
                   help="fwd, bwd, fwd+bwd (default: all three; fwd+bwd with --quick/--scaling)")
    p.add_argument("--repeats", type=_positive(int),
                   help="timed repetitions per pass (default 10; 5 with --quick or --scaling)")
    p.add_argument("--warmup", type=_positive(int), help="untimed runs before timing (default 1 CPU, 3 GPU)")
    p.add_argument("--max-time", type=_positive(float), metavar="S",
                   help="stop repeating a pass after S seconds (at least 3 repetitions; default 10, 3 quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the inputs")
    p.add_argument("--json", metavar="FILE", help="write the report (device, versions, rows) as JSON")
    p.add_argument("--append", action="store_true",
                   help="add to the --json report of an earlier run on this device (rows measured again replace "
                        "theirs): a suite run in parts")
    p.add_argument("--plot", type=_png, metavar="FILE.png",
                   help="speedups over eager; with --scaling, time and memory against B and D")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the headline table as markdown (into an existing file only between its markers)")
    p.add_argument("--from-json", metavar="FILE", help="render a saved report (table, --markdown, --plot); no run")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.set_defaults(func=_bench)


# ------------------------------------------------------------------------------------------------------------ tune

def _device_arg(command: str, device: str) -> str:
    """The --device of a measuring command, checked: cpu, or cuda[:N] where CUDA is available."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"rmi-fast {command}: error: --device cuda, but no CUDA device is available")
    elif device != "cpu":
        raise SystemExit(f"rmi-fast {command}: error: --device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def _tune(args: argparse.Namespace) -> int:
    from rmi_fast import tuning
    from rmi_fast.bench import tune

    if args.quick and args.install:  # its few tiny shapes would then decide "auto" at every size on this device
        raise SystemExit("rmi-fast tune: error: --quick measures a toy grid: its table cannot be --install-ed "
                         "(write it elsewhere with --table)")
    if args.from_json:
        try:
            table = tune.table_from_report(args.from_json)
        except ValueError as exc:
            raise SystemExit(f"rmi-fast tune: error: --from-json {exc}") from None
    else:
        device = _device_arg("tune", args.device)
        report = tune.tune(device=device, quick=args.quick, kernels=args.kernels or tuning.KERNELS,
                           budget_s=args.budget, max_time_s=args.max_time, json_path=args.json, command=sys.argv)
        table = tuning.from_json(report["table"])
        if "stopped" in report:
            print(f"stopped early: {report['stopped']}")
    print(tune.summary(table))
    path = args.table or (str(tuning.default_path(table.device)) if args.install else None)
    if path:
        tuning.save(table, path)
        print(f"table written to {path}")
    return 0


def _add_tune(sub) -> None:
    from rmi_fast.tuning import KERNELS

    p = sub.add_parser(
        "tune", help="measure the fastest backend and Triton backward variant per shape; write the dispatch table",
        description="Times every backend usable on the device, and every backward variant of the Triton kernels, on "
                    "a grid of shapes (each checked against the torch backend first) and derives the table that "
                    "backend='auto' follows on this device (rmi_fast/tuned/<device>.json).")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="a few tiny shapes: checks the machinery in seconds")
    p.add_argument("--kernels", type=_csv("kernels", KERNELS), metavar="K[,K...]",
                   help=f"measure only these kernels ({', '.join(KERNELS)}; default all)")
    p.add_argument("--budget", type=_positive(float), metavar="S",
                   help="start no new shape after S seconds (the report and table keep what was measured)")
    p.add_argument("--max-time", type=_positive(float), default=0.5, metavar="S",
                   help="stop repeating a candidate after S seconds (at least 3 repetitions; default 0.5)")
    p.add_argument("--json", metavar="FILE", help="write the report (every measurement and the table) as JSON")
    p.add_argument("--table", metavar="FILE", help="write the dispatch table to FILE")
    p.add_argument("--install", action="store_true",
                   help="write the dispatch table where rmi_fast reads it for this device (rmi_fast/tuned/)")
    p.add_argument("--from-json", metavar="FILE", help="derive the table from a saved report; no run")
    p.set_defaults(func=_tune)


# ---------------------------------------------------------------------------------------- the paper's system

def _paper_common(p: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    """Flags every command of the paper's system shares; None means the dataset's default (robust.settings)."""
    if dataset:
        p.add_argument("--dataset", default="digits", help="digits (built in), mnist, fashion-mnist, cifar10, svhn")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's published files (not for digits)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--eps", type=_radius, default=None, help="ℓ∞ radius (default: the paper's)")
    p.add_argument("--alpha", type=_positive(float), default=None, help="PGD step size (default: the paper's)")
    p.add_argument("--steps", type=_positive(int), default=None, help="PGD steps (default: the paper's)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads, at most the machine's (default: the dataset's; all cores except for 8×8 digits)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _mi_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimator", default="dv", choices=["dv", "jsd", "infonce"], help="MI bound (paper: dv)")
    p.add_argument("--diagonal", default="exclude", choices=["exclude", "zero"],
                   help="DV/JSD negatives: exclude the positive pair, or 'zero' it (the released code)")
    p.add_argument("--backend", default="auto", help="rmi_fast backend of the bound (auto, cpp, torch, ...)")


def _paper_setup(args: argparse.Namespace, dataset: str):
    """Threads, device and the protocol settings of ``dataset`` with the command line's overrides."""
    import os

    import torch

    from rmi_fast.robust.settings import dataset_settings
    from rmi_fast.robust.utils import resolve_device

    if dataset == "digits" and args.data_dir is not None:
        raise ValueError(f"--data-dir {args.data_dir}: the digits are built in (scikit-learn's), no files are read")
    device = resolve_device(args.device)
    overrides = dict(eps=args.eps, alpha=args.alpha, steps=args.steps, threads=args.threads,
                     encoder_epochs=getattr(args, "epochs", None) if args.command == "train-encoder" else None,
                     estimation_epochs=getattr(args, "estimation_epochs", None),
                     head_epochs=getattr(args, "epochs", None) if args.command == "train-head" else None)
    settings = dataset_settings(dataset, **overrides)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    return device, settings


def _dataset_for(args: argparse.Namespace, encoder_config, trained_on: str | None, source: str) -> str:
    """--dataset, else the one the checkpoint was trained on; its images must be the encoder's input shape."""
    from rmi_fast.robust.data import DATASETS

    dataset = args.dataset or trained_on
    info = DATASETS.get(dataset)
    have = (encoder_config.in_channels, encoder_config.image_size)
    if info is not None and (info.channels, info.image_size) != have:
        raise ValueError(f"--dataset {dataset} has {info.channels}×{info.image_size}×{info.image_size} images, but "
                         f"the encoder of {source} takes {have[0]}×{have[1]}×{have[1]} (trained on {trained_on})")
    return dataset


def _trained_encoder(args: argparse.Namespace):
    """(encoder, its training config, dataset) of --encoder; --eps, --alpha and --steps, where not given, become
    those of the attack it was trained against."""
    from rmi_fast.robust.training import load_encoder

    encoder, config = load_encoder(args.encoder)
    dataset = _dataset_for(args, config.encoder, config.dataset, args.encoder)
    for name in ("eps", "alpha", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(config.attack, name))
    return encoder, config, dataset


def _train_encoder(args: argparse.Namespace) -> int:
    from rmi_fast.robust.data import load_dataset
    from rmi_fast.robust.reproduce import protocol_train_config
    from rmi_fast.robust.training import train_encoder
    from rmi_fast.robust.worst_case import MIConfig

    device, s = _paper_setup(args, args.dataset)
    device, rank = _init_data_parallel(device)
    config = protocol_train_config(args.dataset, args.mode, s, MIConfig(args.estimator, args.diagonal, args.backend),
                                   args.seed, args.attack_input_branch)
    data = load_dataset(args.dataset, "train", args.data_dir, args.limit)
    try:
        run = train_encoder(config, data.images, device=device, checkpoint=args.out,
                            checkpoint_every=args.checkpoint_every, resume=not args.restart,
                            show_progress=not args.quiet)
    finally:
        if rank is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    tail = run.history[-10:]
    if not rank:
        print(f"{args.mode} encoder: {run.step} steps, training MI (last {len(tail)} steps) "
              f"{sum(tail) / max(len(tail), 1):.4f} nats; checkpoint {args.out}")
    return 0


def _init_data_parallel(device):
    """Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, more than one rank): join the process group
    (gloo on the CPU, nccl on CUDA, one GPU per local rank) → (device, rank); otherwise (device, None)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "RANK" not in os.environ or dist.is_initialized():
        return device, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank()


def _estimate_mi(args: argparse.Namespace) -> int:
    import json

    from rmi_fast.robust.data import load_dataset
    from rmi_fast.robust.estimation import adversarial_accuracy_bound, estimate_mi
    from rmi_fast.robust.reproduce import NATS_ESTIMATORS, protocol_estimation_config

    encoder, config, dataset = _trained_encoder(args)
    device, s = _paper_setup(args, dataset)
    train = load_dataset(dataset, "train", args.data_dir, args.limit)
    test = load_dataset(dataset, "test", args.data_dir, args.limit)
    estimation = protocol_estimation_config(config, s, args.seed, args.attack_input_branch)
    estimate = estimate_mi(encoder.to(device), train.images, test.images, estimation, device=device,
                           show_progress=not args.quiet)
    bound = adversarial_accuracy_bound(estimate.mi_worst, s.num_classes) if config.mi.bound in NATS_ESTIMATORS else None
    result = {**estimate.to_dict(), "bound": bound}
    print(json.dumps(result, indent=2))
    return 0


def _train_head(args: argparse.Namespace) -> int:
    from rmi_fast.robust.data import load_dataset
    from rmi_fast.robust.downstream import save_classifier, train_head
    from rmi_fast.robust.reproduce import protocol_head_config

    encoder, _, dataset = _trained_encoder(args)
    device, s = _paper_setup(args, dataset)
    data = load_dataset(dataset, "train", args.data_dir, args.limit)
    head_config = protocol_head_config(args.head, args.training, s, args.seed)
    model = train_head(encoder.to(device), data.images, data.labels, head_config, num_classes=s.num_classes,
                       device=device, show_progress=not args.quiet)
    save_classifier(args.out, model, head_config, dataset=dataset, num_classes=s.num_classes)
    print(f"{args.training} {args.head} head saved to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from rmi_fast.robust.data import load_dataset
    from rmi_fast.robust.downstream import attack_suite, evaluate_classifier, load_classifier

    model, meta = load_classifier(args.model)
    dataset = _dataset_for(args, model.encoder.config, meta["dataset"], args.model)
    device, s = _paper_setup(args, dataset)
    test = load_dataset(dataset, "test", args.data_dir, args.limit)
    metrics = evaluate_classifier(model.to(device), test.images, test.labels, attack_suite(s.eps, s.alpha, s.steps),
                                  device=device, seed=args.seed)
    if args.mi_worst is not None:  # Theorem 3.4 beside the measured accuracies, against the strongest of them
        from rmi_fast.robust.estimation import adversarial_accuracy_bound

        metrics["bound"] = adversarial_accuracy_bound(args.mi_worst, meta["num_classes"])
        metrics["bound_violated"] = metrics["worst"] > metrics["bound"]
    print(json.dumps(metrics, indent=2))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from rmi_fast.robust.reproduce import ReproduceOptions, run

    report = run(ReproduceOptions(
        dataset=args.dataset, out=args.out, device=args.device, seed=args.seed, epochs=args.epochs, eps=args.eps,
        alpha=args.alpha, steps=args.steps, data_dir=args.data_dir, estimator=args.estimator,
        diagonal=args.diagonal, backend=args.backend, estimation_epochs=args.estimation_epochs,
        head_epochs=args.head_epochs, train_limit=args.limit, test_limit=args.limit, threads=args.threads,
        attack_input_branch=args.attack_input_branch, restart=args.restart, show_progress=not args.quiet))
    for mode, e in report["encoders"].items():
        print(f"{mode:>10}: I = {e['mi_natural']:.3f}, I_worst = {e['mi_worst']:.3f}, RV = {e['rv']:.3f} nats"
              + (f", Theorem 3.4 bound {min(e['bound'], 1.0):.3f}" if e["bound"] is not None else ""))
    for r in report["downstream"]:
        print(f"{r['encoder']:>10} + {r['head_training']:>8} {r['head']:<6}: natural {r['natural_acc']:.3f}, "
              f"adversarial {r['adversarial_acc']:.3f} (strongest {r['adversarial_acc_strongest']:.3f})")
    checks = report["checks"]
    for v in checks["bound_violations"]:
        print(f"BOUND VIOLATION: {v}")
    print(f"report: {args.out}/report.json, report.md, mi.png, accuracy.png "
          f"({report['timing_seconds']['total']:.0f} s)")
    return 0


_ENCODER_ATTACK = "--eps, --alpha and --steps default to those of the attack the encoder was trained against"
_INPUT_BRANCH_HELP = ("let the worst-case attack's gradient flow through the critic's input branch too (a stronger "
                      "attack; the released code detached it)")


def _add_paper(sub) -> None:
    p = sub.add_parser("train-encoder", help="train an encoder: standard infomax or worst-case MI (checkpointed)")
    _paper_common(p)
    _mi_flags(p)
    p.add_argument("--mode", default="worst-case", choices=["infomax", "worst-case"])
    p.add_argument("--out", required=True, help="checkpoint file (an existing one of the same config is resumed)")
    p.add_argument("--epochs", type=_positive(int), default=None)
    p.add_argument("--limit", type=_positive(int), default=None, help="use only the first N training images")
    p.add_argument("--checkpoint-every", type=_positive(int), default=0, help="steps (default: every epoch)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--attack-input-branch", action="store_true", help=_INPUT_BRANCH_HELP)
    p.set_defaults(func=_train_encoder)

    p = sub.add_parser("estimate-mi", help="natural and worst-case MI of a trained encoder (Algorithm 2), RV, bound",
                       epilog=_ENCODER_ATTACK)
    _paper_common(p, dataset=False)
    p.add_argument("--encoder", required=True, help="encoder checkpoint from train-encoder")
    p.add_argument("--dataset", default=None, help="default: the encoder's")
    p.add_argument("--estimation-epochs", type=_positive(int), default=None)
    p.add_argument("--limit", type=_positive(int), default=None)
    p.add_argument("--attack-input-branch", action=argparse.BooleanOptionalAction, default=None,
                   help=_INPUT_BRANCH_HELP + "; default: as the encoder was trained")
    p.set_defaults(func=_estimate_mi)

    p = sub.add_parser("train-head", help="train a linear or MLP head on a frozen encoder, standard or robust",
                       epilog=_ENCODER_ATTACK)
    _paper_common(p, dataset=False)
    p.add_argument("--encoder", required=True, help="encoder checkpoint from train-encoder")
    p.add_argument("--dataset", default=None, help="default: the encoder's")
    p.add_argument("--head", default="mlp", choices=["linear", "mlp"])
    p.add_argument("--training", default="standard", choices=["standard", "robust"])
    p.add_argument("--epochs", type=_positive(int), default=None)
    p.add_argument("--limit", type=_positive(int), default=None)
    p.add_argument("--out", required=True, help="classifier checkpoint to write")
    p.set_defaults(func=_train_head)

    p = sub.add_parser("evaluate", help="natural and adversarial accuracy (paper's PGD, PGD restarts, APGD)")
    _paper_common(p, dataset=False)
    p.add_argument("--model", required=True, help="classifier checkpoint from train-head")
    p.add_argument("--dataset", default=None, help="default: the classifier's")
    p.add_argument("--limit", type=_positive(int), default=None)
    p.add_argument("--mi-worst", type=float, default=None, metavar="NATS",
                   help="the encoder's worst-case MI (estimate-mi's mi_worst, DV or InfoNCE): adds the Theorem 3.4 "
                        "bound on adversarial accuracy and whether the strongest attack's accuracy exceeds it")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("reproduce", help="the paper's experiment end to end: report.json, report.md, plots")
    _paper_common(p)
    _mi_flags(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=_positive(int), default=None, help="encoder training epochs")
    p.add_argument("--estimation-epochs", type=_positive(int), default=None, help="critic epochs per MI estimate")
    p.add_argument("--head-epochs", type=_positive(int), default=None)
    p.add_argument("--limit", type=_positive(int), default=None, help="first N images of each split (smoke runs)")
    p.add_argument("--attack-input-branch", action="store_true", help=_INPUT_BRANCH_HELP + ", in training and "
                   "estimation")
    p.add_argument("--restart", action="store_true", help="train the encoders anew, ignoring checkpoints in --out")
    p.set_defaults(func=_reproduce)


# ------------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmi-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_bench(sub)
    _add_tune(sub)
    _add_paper(sub)
    return parser


#: The flags that name a file or folder a command writes: checked before the command's work, not after it.
_OUTPUT_FLAGS = ("out", "json", "plot", "markdown", "table")
#: The commands whose --out is a folder (every other output is a file).
_FOLDER_OUT = ("reproduce",)
#: The flags that name a file a command reads, which no output may overwrite.
_INPUT_FLAGS = ("encoder", "model", "from_json")


def _check_writable(command: str, flag: str, path: str) -> None:
    """The nearest existing folder on the way to ``path`` must be a writable folder (the commands create the rest);
    a new file in an existing folder is created and removed again, which also catches a folder that takes no files
    (/proc, a read-only mount) whatever the permission bits say."""
    if not path.strip():
        raise ValueError(f"--{flag}: an empty path")
    target = Path(path).expanduser().absolute()
    wants_folder = flag == "out" and command in _FOLDER_OUT
    if target.is_dir() and not wants_folder:
        raise ValueError(f"--{flag} {path}: is a folder, not a file")
    if target.exists() and not target.is_dir() and wants_folder:
        raise ValueError(f"--{flag} {path}: is a file, not a folder")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} {path}: cannot write under {folder}")
    if not wants_folder and not target.exists() and folder == target.parent:
        try:
            target.open("xb").close()
            target.unlink()
        except OSError as exc:
            raise ValueError(f"--{flag} {path}: cannot write there ({exc.strerror or exc})") from exc


def _check_inputs_kept(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """No output may be one of the command's input files (train-head --out ENC.pt would replace the encoder)."""
    for out_flag, out_path in outputs.items():
        for in_flag, in_path in inputs.items():
            if Path(out_path).expanduser().resolve() == Path(in_path).expanduser().resolve():
                raise ValueError(f"--{out_flag} {out_path} is the --{in_flag.replace('_', '-')} file: writing it would "
                                 "replace what the command reads")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A bad argument or input found while it runs (a ValueError, or an OSError such as a missing
    data file) ends it with a one-line error, as argparse's own; RMI_FAST_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        outputs = {flag: getattr(args, flag) for flag in _OUTPUT_FLAGS if getattr(args, flag, None) is not None}
        for flag, path in outputs.items():
            _check_writable(args.command, flag, path)
        _check_inputs_kept(outputs, {flag: getattr(args, flag) for flag in _INPUT_FLAGS
                                     if getattr(args, flag, None) is not None})
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        if os.environ.get("RMI_FAST_DEBUG") == "1":
            raise
        print(f"rmi-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
