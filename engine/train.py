"""The training job: `.venv/bin/mpiexec -n N .venv/bin/python -m engine.train [options]` (--help).

One process per rank. Every rank builds the same model from the same seed (rank 0's
parameters are broadcast anyway), reads its own shard of each global batch, and per step:

    forward -> loss -> backward, whose grad_ready callback hands finished gradient
    buckets to the reducer -> the reducer's all-reduces overlap the rest of backward ->
    wait for them -> optimizer update over the flat buffers (1/N folded into grad_scale)

Nothing in a step blocks the host (on a GPU the host runs ahead of the device): the loss
and top-1 stay on the device, are summed over ranks asynchronously and read one step
late (engine.stepstats), so step s's progress line and its NaN check come after step s+1
is enqueued, and the last step's after the loop. Only --trace synchronizes inside a step.

Then the progress line and the metrics file (rank 0), the step-boundary agreement of all
ranks (engine.control: stop on SIGTERM, SIGINT, SIGHUP or a closed stdout, periodic
checkpoint due), checkpoints (rank 0 writes, every --checkpoint-minutes, every
--checkpoint-every steps, on a stop and at the end, with the BN statistics all-reduced
first), evaluation every --eval-every epochs and at the end. With the defaults this trains
ResNet-50 on the built-in digits, in a run directory of its own (engine.rundir).

Options are parsed and checked before MPI starts, so --help and a bad option answer at
once, naming the option, printed by rank 0 only.

Exit status: 0 done (or the run was already complete); 1 an error (its message says which
rank and why), or trained but the final model not saved (the last line says so); 2 a usage
error or a start-up refusal (locked, unwritable or full directory, unusable checkpoint); 3
the watchdog found a stuck collective; 75 (STOPPED_EXIT_CODE) stopped by SIGTERM, SIGINT,
SIGHUP or a closed output pipe after saving a checkpoint: resubmit with --resume auto.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Run as the job, before anything loads NumPy (engine.data below does): OpenBLAS's idle
    # workers spin for ~0.1 s after each GEMM by default, on the cores the work between GEMMs
    # is split over (engine.parallel); with this they sleep at once (ResNet-50 step at 224 px,
    # 2 threads: 2.2-2.4 s against 2.6-2.7 s spinning). OpenBLAS reads it once, when it loads;
    # importing the engine as a library changes no environment.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import contextlib
import math
import shlex
import signal
import sys
import time

from engine.data import DATASETS

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Data-parallel ResNet training with the large-minibatch recipe of Akiba et al. "
                    "(RMSprop warm-up, slow-start learning rate, batch norm without moving averages). "
                    "Run it under MPI: .venv/bin/mpiexec -n N .venv/bin/python -m engine.train [options] "
                    "(or `source .venv/bin/activate` first, then mpiexec -n N python -m engine.train).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits: scikit-learn's 1,797 8x8 digits, upscaled, fixed 80/20 split (no download); "
                        "imagefolder: --data DIR in ImageNet layout; synthetic: generated learnable images")
    g.add_argument("--data", metavar="DIR",
                   help="root of an ImageNet-layout data set: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG "
                        "(implies --dataset imagefolder)")
    g.add_argument("--image-size", type=int, default=40,
                   help="side of the square training and validation crops (ImageNet: 224; the digits "
                        "default 40 leaves ResNet's last stage a 2x2 map, which learns far faster than 1x1 at 32)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes per rank decoding and augmenting images "
                        "(default: 0 for in-memory data sets, 2 for imagefolder)")
    g = p.add_argument_group("model and recipe")
    g.add_argument("--arch", default="resnet50", choices=ARCHS, help="network")
    g.add_argument("--batch-per-rank", type=int, default=32, help="images per rank per step")
    g.add_argument("--epochs", type=float, default=6,
                   help="length of the run; every schedule boundary is scaled from the paper's 90 epochs")
    g.add_argument("--schedule", default="paper", choices=("paper", "goyal"),
                   help="paper: slow-start learning rate (+ RMSprop warm-up with the hybrid optimizer); "
                        "goyal: linear warm-up then steps at 1/3, 2/3, 8/9 of the run")
    g.add_argument("--optimizer", default="hybrid", choices=("hybrid", "sgd"),
                   help="hybrid: RMSprop blended into momentum SGD (a_sgd from the schedule); sgd: momentum SGD")
    g.add_argument("--lr", type=float, default=0.05,
                   help="learning rate for a 256-image global batch, scaled linearly to the real global batch "
                        "(ImageNet recipe: 0.1; on the digits, 64 images per step, ResNet-50 is unstable at 0.1)")
    g.add_argument("--eta-rms", type=float, default=1e-4,
                   help="rate of the RMSprop term during the warm-up (this reimplementation's choice; "
                        "without bias correction its first steps are ~10x this, so the digits default "
                        "is below engine.schedule's 3e-4)")
    g.add_argument("--a-sgd-form", default="smooth", choices=("smooth", "published"),
                   help="middle branch of a_sgd(e): 0.5+(e-c)/p (smooth) or 0.5+2(e-c)/p (as transcribed)")
    g.add_argument("--momentum", type=float, default=0.9, help="mu1 of the update")
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="L2 on conv and fc weights (not on batch-norm and bias parameters)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    g.add_argument("--zero-init-residual", action="store_true",
                   help="start every residual block's last batch-norm scale at 0")
    g = p.add_argument_group("communication and device")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: a GPU per rank if CuPy sees one, else NumPy on the CPU")
    g.add_argument("--bucket-mb", type=float, default=4.0,
                   help="gradient all-reduce bucket size in MB (buckets overlap backward)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                   help="fp32: float32 throughout; tf32: float32 storage, GEMMs on TF32 tensor cores (GPU; "
                        "the CPU computes fp32); bf16: bfloat16 activations and GEMM inputs, float32 "
                        "accumulation, master weights, optimizer state and BN statistics")
    g.add_argument("--conv", default="im2col", choices=("im2col", "auto", "cudnn"),
                   help="GPU convolutions: im2col + one GEMM (the default until cuDNN has run on a GPU), "
                        "cudnn (engine/cudnn_conv.py; each conv shape self-checked against im2col at first "
                        "sight, a failing one falls back with a warning), auto (cudnn where libcudnn loads); "
                        "the CPU always uses im2col")
    g.add_argument("--cudnn-workspace-mb", type=float, default=64.0,
                   help="--conv cudnn: no algorithm needing more workspace than this is chosen")
    g.add_argument("--cudnn-search", default="find", choices=("find", "heuristic"),
                   help="--conv cudnn: choose each conv's algorithms by timing them on real buffers "
                        "(cudnnFind...AlgorithmEx, once per shape) or by cuDNN's heuristic")
    g.add_argument("--cuda-graph", action="store_true",
                   help="GPU: capture the whole training step once as a CUDA graph after two eager steps "
                        "and replay it (one launch per step instead of hundreds; engine/graph_step.py)")
    g.add_argument("--fp16-allreduce", action="store_true",
                   help="all-reduce gradients in FP16 (compute stays FP32), as the paper did")
    g.add_argument("--threads", type=int, default=None,
                   help="threads per rank, for the GEMMs and for the work between them (default: this "
                        "node's cores divided by its ranks; more threads than cores slows every rank down)")
    g.add_argument("--watchdog", type=float, default=300.0, metavar="SECONDS",
                   help="end the job, naming the late ranks, when a collective waits longer than this (0: off)")
    g.add_argument("--trace", metavar="FILE",
                   help="write a Chrome trace (chrome://tracing, Perfetto) of compute and communication")
    g = p.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the initialization, the per-epoch shuffles and every augmentation")
    g.add_argument("--eval-every", type=float, default=1.0,
                   help="evaluate every this many epochs (0: only at the end)")
    g.add_argument("--runs-dir", default="runs", help="where run directories are made")
    g.add_argument("--run-name", metavar="NAME",
                   help="the run directory is RUNS_DIR/NAME (default: the start time, or with --resume auto "
                        "a name derived from the run's settings, so a resubmitted command finds its run)")
    g.add_argument("--checkpoint-dir",
                   help="where checkpoints go (written by rank 0, atomically; default: RUN_DIR/checkpoints)")
    g.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save a checkpoint every this many minutes of the job, by rank 0's clock (0: off); "
                        "a kill -9 or a dead node loses at most this much work (a ResNet-50 save took 1 s here)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save a checkpoint every this many steps (0: off); one is always saved at "
                        "the end and when SIGTERM or SIGINT stops the job")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    g.add_argument("--resume", metavar="auto|PATH",
                   help="auto: continue this run (--run-name) from its newest intact checkpoint, or start it "
                        "if it has none; PATH: a checkpoint file, or the newest intact one in a directory")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many global steps (the schedule still spans --epochs)")
    g.add_argument("--log-dir", help="where metrics.jsonl goes (default: the run directory)")
    g.add_argument("--progress", default="auto", choices=("auto", "bar", "lines"),
                   help="auto: a bar redrawn in place when the launching terminal is a terminal "
                        "(also under mpiexec), else plain lines")
    g.add_argument("--print-every", type=int, default=5,
                   help="print a progress line every this many steps (when not on a terminal)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed options; a bad value exits with usage and a message naming the option."""
    p = build_parser()
    args = p.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.data and args.dataset == "digits":
        args.dataset = "imagefolder"
    if args.dataset == "imagefolder" and not args.data:
        p.error("--dataset imagefolder needs --data DIR")
    if args.data and args.dataset != "imagefolder":
        p.error(f"--data is only used with --dataset imagefolder, not {args.dataset}")
    positive = {"--image-size": args.image_size, "--batch-per-rank": args.batch_per_rank,
                "--epochs": args.epochs, "--lr": args.lr, "--bucket-mb": args.bucket_mb,
                "--keep-checkpoints": args.keep_checkpoints, "--print-every": args.print_every}
    for name, value in positive.items():
        if not value > 0:
            p.error(f"{name} must be positive, got {value}")
    nonneg = {"--eta-rms": args.eta_rms, "--weight-decay": args.weight_decay, "--eval-every": args.eval_every,
              "--checkpoint-every": args.checkpoint_every, "--workers": args.workers or 0,
              "--checkpoint-minutes": args.checkpoint_minutes, "--watchdog": args.watchdog}
    for name, value in nonneg.items():
        if value < 0:
            p.error(f"{name} must be >= 0, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be at least 1 (leave it out to train for all of --epochs), got {args.max_steps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.image_size < 32:
        p.error(f"--image-size must be at least 32 (ResNet downsamples 32x), got {args.image_size}")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.label_smoothing < 1:
        p.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.run_name is not None and (not args.run_name or os.sep in args.run_name or args.run_name in (".", "..")):
        p.error(f"--run-name must be a plain directory name, got {args.run_name!r}")
    if args.conv == "cudnn" and args.device == "cpu":
        p.error("--conv cudnn needs a GPU; the CPU convolves by im2col")
    if args.cudnn_workspace_mb < 0:
        p.error(f"--cudnn-workspace-mb must be >= 0, got {args.cudnn_workspace_mb}")
    if args.cuda_graph and args.device == "cpu":
        p.error("--cuda-graph needs a GPU: it captures CUDA work, and --device cpu has none")
    if args.cuda_graph and args.trace:
        p.error("--cuda-graph cannot be traced: --trace times every span with events read on the host, "
                "which a captured step cannot do; trace an eager run")
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        p.error(f"--resume {args.resume}: no such file or directory")
    args.argv = list(sys.argv[1:] if argv is None else argv)     # for the command that resumes the run
    if args.workers is None:
        args.workers = 2 if args.dataset == "imagefolder" else 0
    return args


def limit_blas_threads(threads: int | None) -> int:
    """Cap this rank's BLAS threads (default: cores of the node / ranks on the node)."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits
    if threads is None:
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        threads = max(1, len(os.sched_getaffinity(0)) // node.size)
        node.Free()
    threadpool_limits(limits=threads, user_api="blas")
    return threads


class Trainer:
    """One rank of the job: set up from the options, then `run()`.

    `signals`: the job's engine.guard.StopSignals (main installs them); without, no signal
    stops the run early. Start-up refusals raise engine.rundir.Refused on every rank."""

    def __init__(self, args, signals=None):
        from mpi4py import MPI

        from engine.backend import DeviceError, job_backend
        from engine.control import StepControl
        from engine.comm import create_communicator
        from engine.data import DataError, build_datasets
        from engine.guard import StopSignals, Watchdog, on_every_rank
        from engine.loader import Loader, ShardSampler
        from engine.metrics import Progress
        from engine.model import build_model
        from engine.optimizer import make_optimizer
        from engine.reducer import Reducer
        from engine.stepstats import StepStats
        from engine.trace import DeviceClock, Timeline, instrument
        from engine.transforms import TrainTransform, ValTransform

        self.args = a = args
        self.backend = be = job_backend(MPI.COMM_WORLD, a.device)  # before any communicator: one backend
        # A data set some rank cannot read stops the job with one message, before a run directory exists.
        self.train_set, self.val_set = on_every_rank(
            MPI.COMM_WORLD, lambda: build_datasets(a.dataset, data_dir=a.data, image_size=a.image_size, seed=a.seed),
            DataError)
        world, ts = MPI.COMM_WORLD, self.train_set
        self.sampler = on_every_rank(    # a global batch larger than the data set: also said once
            world, lambda: ShardSampler(len(ts), world.rank, world.size, a.batch_per_rank, a.seed), DataError)
        self.locks = []
        self._prepare_run_dir(world)   # after the device checks: a job they stop leaves no run directory
        self.comm = comm = create_communicator(be)
        self.rank, self.world = comm.rank, comm.size
        self.threads = limit_blas_threads(a.threads)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = max(1, round(a.epochs * self.steps_per_epoch))
        self.stop_step = min(self.total_steps, a.max_steps) if a.max_steps else self.total_steps
        self.loader = Loader(ts, TrainTransform(a.image_size, ts.crop_scale, ts.flip), ValTransform(a.image_size),
                             seed=a.seed, workers=a.workers, warn=self._warn, val_dataset=self.val_set)
        self.val_loader = self.loader   # one worker pool per rank serves both splits

        self.model = build_model(a.arch, ts.num_classes, be, zero_init_residual=a.zero_init_residual,
                                 seed=a.seed, threads=self.threads, precision=a.precision)
        self.optimizer = make_optimizer(a.optimizer, self.model.params, self.model.layout, be,
                                        mu1=a.momentum, weight_decay=a.weight_decay, team=self.model.ws.team,
                                        weight_copy=self.model.params_lp)
        self.coefficients = self._schedule()
        self._route_convs()
        # Without --trace the timeline is disabled: no span, no figure, no synchronize. On a
        # GPU, compute spans are timed by events on the compute stream, on the same reference
        # event as the communicator's all-reduce times (comm.host_time), renewed every step.
        clock = (DeviceClock(be.xp.cuda.Event, be.current_stream, comm.host_time, comm.rebase_clock)
                 if a.trace and be.is_gpu else None)
        self.timeline = Timeline(self._trace_path(), rank=self.rank, enabled=bool(a.trace), clock=clock)
        if a.trace:     # per-layer forward/backward spans; none of their cost without --trace
            instrument(self.model, self.timeline)
        self.reducer = Reducer(self.model.layout, self.model.grads, comm, bucket_mb=a.bucket_mb,
                               fp16=a.fp16_allreduce, timeline=self.timeline, update_once=be.is_gpu)
        # Same layout and options on every rank, then rank 0's initial parameters everywhere.
        self.reducer.startup(self.model.params, {k: v for k, v in vars(a).items()})
        self.model.refresh_weight_copy()        # the broadcast wrote params
        if a.trace:     # a common mark on every rank's clock, so `trace merge` lines ranks up
            self.timeline.sync(comm)
        self.resume_from = self._choose_checkpoint(MPI.COMM_WORLD)
        self.signals = signals or StopSignals()
        # A closed output pipe stops the job as a signal would (the pipe's reader is gone:
        # whoever watched it would not see the job's end), its lines go on to stderr and train.log.
        self.progress = Progress(self.rank == 0, a.log_dir, self.total_steps, a.print_every,
                                 resume_step=self.resume_from and self.resume_from["step"], mode=a.progress,
                                 on_broken_output=lambda: self.signals.request(signal.SIGPIPE))
        self.global_step = self.saved_step = 0
        self.saved_path, self.save_failing, self.stopped_by, self.exit_status = None, False, 0, 0
        self.abandoned = None           # why the stop's save was abandoned (StopSignals)
        self.save_error = None          # why the newest save failed, while saves fail
        self.bn_synced_at = -1          # the global step whose BN statistics were last all-reduced
        self.control = StepControl(MPI.COMM_WORLD, self.signals, 60 * a.checkpoint_minutes)
        self.stats = StepStats(be, comm)
        self.grad_scale = 1.0 / self.world      # the all-reduce sums; the update averages
        self.graphed = None
        self._steps_run = self._evaluations = 0     # in this job (the first of each: _say_conv_notes)
        if a.cuda_graph:
            from engine.graph_step import GraphedStep
            if not be.is_gpu:
                raise DeviceError("--cuda-graph needs a GPU, and this job runs on the CPU (--device auto found "
                                  "none)", collective=True)
            self.graphed = GraphedStep(be, self._step, self.optimizer, self.grad_scale)
        self.watchdog = Watchdog(comm, a.watchdog).start() if a.watchdog > 0 else None

    # ---- set-up helpers --------------------------------------------------------------------

    def _route_convs(self) -> None:
        """--conv: the model's convolutions through cuDNN where asked for and possible."""
        from engine.backend import DeviceError
        a = self.args
        self._conv_notes = []       # this rank's, said once per job by _say_conv_notes
        if a.conv == "cudnn" and not self.backend.is_gpu:
            raise DeviceError("--conv cudnn needs a GPU, and this job runs on the CPU (--device auto found "
                              "none)", collective=True)
        if a.conv == "im2col" or not self.backend.is_gpu:
            return                          # auto on the CPU: im2col
        from engine import cudnn, cudnn_conv
        try:
            cudnn.version()
        except cudnn.CudnnMissing as e:
            if a.conv == "cudnn":
                raise DeviceError(f"--conv cudnn: {e}") from None
            self._conv_notes.append(f"--conv auto: convolutions by im2col, cuDNN did not load "
                                    f"({str(e).splitlines()[0]})")
            return
        cudnn_conv.route_convolutions(self.model.convs, a.precision, int(a.cudnn_workspace_mb * (1 << 20)),
                                      a.cudnn_search, self._conv_notes.append)

    def _say_conv_notes(self) -> None:
        """Every rank's notes on its convolutions (cuDNN missing, conv shapes that failed the
        self-check and fell back to im2col), gathered and said by rank 0, one line per
        distinct note with the ranks that had it. Collective: called after the job's first
        training step and after its first evaluation, where every rank has seen every conv
        shape of that phase (the self-check runs at a shape's first sight)."""
        if self.args.conv == "im2col":
            return
        gathered = self.comm.world.allgather(list(self._conv_notes))
        self._conv_notes.clear()
        by_note = {}
        for rank, notes in enumerate(gathered):
            for note in notes:
                by_note.setdefault(note, []).append(rank)
        if self.rank == 0:
            for note, ranks in by_note.items():
                who = "every rank" if len(ranks) == self.world else f"rank{'s' * (len(ranks) > 1)} " + \
                    ",".join(map(str, ranks))
                print(f"engine.train: {note} ({who})", file=sys.stderr, flush=True)

    def _warn(self, message: str) -> None:
        print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)

    def _trace_path(self):
        if not self.args.trace:
            return None
        root, ext = os.path.splitext(self.args.trace)
        return f"{root}.rank{self.rank}{ext or '.json'}" if self.world > 1 else self.args.trace

    def _schedule(self):
        """epoch -> Coefficients; with --optimizer sgd, RMSprop never enters (a_sgd = 1)."""
        from engine.schedule import Coefficients, make_schedule
        a = self.args
        name = "hybrid" if a.schedule == "paper" else "goyal"
        sched = make_schedule(name, self.sampler.global_batch, a.epochs, base_lr=a.lr,
                              a_sgd_form=a.a_sgd_form, eta_rms=a.eta_rms)
        if a.optimizer == "sgd":
            return lambda epoch: Coefficients(sched(epoch).eta)
        return sched

    def describe(self) -> str:
        a, ts = self.args, self.train_set
        return (f"engine.train: {a.arch} on {a.dataset} ({len(ts)} train / {len(self.val_set)} val images, "
                f"{ts.num_classes} classes, {a.image_size} px), {self.world} ranks x {a.batch_per_rank} = "
                f"{self.sampler.global_batch} images per step, {self.steps_per_epoch} steps per epoch, "
                f"{self.total_steps} steps ({a.epochs:g} epochs), {a.optimizer} optimizer with the {a.schedule} "
                f"schedule, device {self.backend.name}, {self.threads} BLAS thread(s) and {a.workers} data "
                f"worker(s) per rank")

    # ---- run directory and checkpoints ---------------------------------------------------------

    def _settings(self, world_size: int, legacy: bool = False) -> dict:
        """The options that define a run: a resubmittable job's default name is made from them.
        The global batch, not ranks x images per rank: a job resubmitted at another rank count
        with the same global batch finds its run. legacy: the settings names were made of
        before issue 20 (ranks and images per rank), to find a run started then."""
        a = self.args
        keys = ("arch", "dataset", "data", "image_size", "seed", "epochs", "schedule",
                "optimizer", "lr", "eta_rms", "momentum", "weight_decay", "label_smoothing")
        if legacy:
            return dict({k: getattr(a, k) for k in keys}, batch_per_rank=a.batch_per_rank, world_size=world_size)
        return dict({k: getattr(a, k) for k in keys}, global_batch=a.batch_per_rank * world_size)

    def _default_run_name(self, world_size: int) -> str:
        from engine import rundir
        if self.args.resume != "auto":
            return rundir.default_run_name(None)
        name = rundir.default_run_name(self._settings(world_size))
        legacy = rundir.default_run_name(self._settings(world_size, legacy=True))
        runs = self.args.runs_dir
        if not os.path.exists(os.path.join(runs, name)) and os.path.isdir(os.path.join(runs, legacy)):
            return legacy
        return name

    def _prepare_run_dir(self, world) -> None:
        """Rank 0 names the run, locks its directories, checks they are writable and removes
        the temporary files of a killed save; every rank gets the resulting paths."""
        from engine import checkpoint, rundir
        a = self.args

        def decide():
            name = a.run_name or self._default_run_name(world.size)
            run_dir = os.path.join(a.runs_dir, name)
            if not (a.log_dir and (a.checkpoint_dir or a.no_checkpoint)) and not a.run_name and a.resume != "auto":
                run_dir = rundir.claim_new(a.runs_dir, name)
            log_dir, ckpt_dir = a.log_dir or run_dir, a.checkpoint_dir or os.path.join(run_dir, "checkpoints")
            outputs = [(log_dir, "--log-dir")] + ([] if a.no_checkpoint else [(ckpt_dir, "--checkpoint-dir")])
            locked = set()
            for path, option in outputs:
                rundir.check_writable(path, option)
                if os.path.realpath(path) not in locked:
                    self.locks.append(rundir.RunLock(path, option))
                    locked.add(os.path.realpath(path))
            stale = [] if a.no_checkpoint else checkpoint.remove_stale_temps(ckpt_dir)
            return os.path.basename(run_dir), log_dir, ckpt_dir, stale

        self.run_name, a.log_dir, a.checkpoint_dir, stale = rundir.decided_by_rank0(world, decide)
        if stale and world.rank == 0:
            print(f"engine.train: removed {len(stale)} temporary file(s) of an interrupted save: "
                  f"{', '.join(stale)}", flush=True)

    def _choose_checkpoint(self, world) -> dict | None:
        """Rank 0 checks there is room for a checkpoint and picks the one to resume from (the
        newest that verifies and belongs to this run); None: a fresh start."""
        from engine import checkpoint, rundir
        a = self.args

        def decide():
            found = [] if a.no_checkpoint else checkpoint.list_checkpoints(a.checkpoint_dir)
            mine = checkpoint.of_run(found, self._run_identity())
            if not a.no_checkpoint:
                # The run's saves need room for --keep-checkpoints of them, plus the next one
                # while it is written (older ones are pruned only after it is durable).
                room = max(1, a.keep_checkpoints + 1 - len(mine))
                rundir.check_room(a.checkpoint_dir, room * self.checkpoint_bytes(), "--checkpoint-dir",
                                  f"{room} checkpoint(s) (--keep-checkpoints {a.keep_checkpoints} and the next save "
                                  f"while it is written) need")
            if a.resume == "auto":
                source = a.checkpoint_dir if found else None
            else:
                source = a.resume
            if source is None:
                if mine:
                    raise rundir.Refused(f"{a.checkpoint_dir} already holds checkpoints of this run (newest "
                                         f"{mine[-1]}): continue it with --resume auto, or start another run "
                                         f"with another --run-name")
                return None
            path, _, meta, skipped = checkpoint.newest_intact(source, self._run_identity())
            checkpoint.check_compatible(path, meta, self._run_identity(), layout=self.model.layout)
            return dict(path=path, step=int(meta["global_step"]), skipped=[str(e) for e in skipped])

        return rundir.decided_by_rank0(world, decide)

    def _run_identity(self) -> dict:
        """What must match for a checkpoint to continue this run's trajectory. The global batch,
        not the rank count: the data order, augmentation and schedule depend only on it, the
        seed and the global step, so a job of another rank count may continue the run."""
        a = self.args
        return dict(arch=a.arch, layout=self.model.layout.signature(), dataset=a.dataset,
                    image_size=a.image_size, num_classes=self.train_set.num_classes,
                    global_batch=self.sampler.global_batch, seed=a.seed, epochs=a.epochs, schedule=a.schedule,
                    optimizer=a.optimizer, lr=a.lr)

    def _checkpoint_path(self) -> str:
        """This step's checkpoint, named with the run's id: never another run's file."""
        from engine import checkpoint
        return checkpoint.path_for(self.args.checkpoint_dir, self.global_step, checkpoint.run_id(self._run_identity()))

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: parameters, two optimizer buffers, a little header."""
        return 3 * self.model.params.nbytes + 2**20

    def _sync_bn_stats(self) -> None:
        """Collective: BN's evaluation statistics become those of all ranks' last batches, once
        per step. Evaluation and every checkpoint use them, so a saved model evaluates as the
        job reported (a second all-reduce could move them by a rounding)."""
        from engine.bn_sync import allreduce_bn_stats
        if self.bn_synced_at != self.global_step:
            allreduce_bn_stats(self.model, self.comm)
            self.bn_synced_at = self.global_step

    def save_checkpoint(self) -> None:
        """Rank 0 saves; a failed save (full or read-only disk) is reported once and training
        goes on: the next interval tries again, and the previous checkpoints stay intact.
        Collective while the BN statistics of this step are not yet all-reduced: every rank
        calls it at the same steps (after the final evaluation, where rank 0 alone may call
        it, they are)."""
        from engine import checkpoint, rundir
        from engine.guard import SaveAbandoned
        a = self.args
        self.control.checkpointed()
        if a.no_checkpoint:
            return
        self._sync_bn_stats()
        if self.rank != 0:
            return
        asnp = self.backend.asnumpy
        opt = self.optimizer.state_dict()
        arrays = {"params": asnp(self.model.params)}
        arrays.update({f"optimizer.{k}": v for k, v in opt.items() if hasattr(v, "dtype")})
        for bn in self.model.batchnorms:
            arrays[f"bn.{bn.name}.eval_mean"] = asnp(bn.eval_mean)
            arrays[f"bn.{bn.name}.eval_var"] = asnp(bn.eval_var)
        # world_size, batch_per_rank, blas_threads: how the run was split when saved (not its
        # identity: another split continues it, though not bit for bit, see load_checkpoint);
        # data, precision: what engine.evaluate needs to rebuild the model and its data.
        meta = dict(self._run_identity(), world_size=self.world, batch_per_rank=a.batch_per_rank, data=a.data,
                    precision=a.precision, blas_threads=self.threads, bn_statistics="all ranks' last batches",
                    global_step=self.global_step,
                    epoch=self.global_step // self.steps_per_epoch, step=self.global_step % self.steps_per_epoch,
                    random_state={"seed": a.seed, "position": self.global_step},
                    optimizer_state={k: v for k, v in opt.items() if not hasattr(v, "dtype")})
        path = self._checkpoint_path()
        try:
            with self.signals.writing_file():       # the file only: once durable, it is not abandoned
                checkpoint.save(path, arrays, meta)      # removes its temporary file if it fails
            checkpoint.prune(a.checkpoint_dir, a.keep_checkpoints, self._run_identity())
        except SaveAbandoned as e:
            self.abandoned = f"the checkpoint of step {self.global_step} was abandoned ({e}) and not written"
            return
        except OSError as e:
            if not rundir.is_environment_error(e):
                raise
            self.save_error = f"{e.strerror or e}"
            if not self.save_failing:
                self.progress.warn(f"checkpoint of step {self.global_step} not saved: {e.strerror or e} "
                                   f"({a.checkpoint_dir}); training goes on and tries again at the next "
                                   f"checkpoint" + (f"; the newest saved is {self.saved_path}" if self.saved_path
                                                    else ""))
            self.save_failing = True
            return
        if self.save_failing:
            self.progress.warn(f"saving checkpoints works again ({path})")
        self.saved_step, self.saved_path, self.save_failing, self.save_error = self.global_step, path, False, None
        self.progress.message(f"checkpoint {path} (step {self.global_step})")

    def load_checkpoint(self, chosen: dict) -> None:
        """Every rank loads the checkpoint rank 0 chose and verified (_choose_checkpoint)."""
        from engine import checkpoint
        path = chosen["path"]
        arrays, meta = checkpoint.load(path)
        arrays, meta = checkpoint.upgrade_conv_layout(path, arrays, meta, self.model.layout, self.progress.warn)
        for skipped in chosen["skipped"]:
            self.progress.warn(f"skipped: {skipped}")
        xp = self.backend.xp
        self.model.params[...] = xp.asarray(arrays["params"])
        self.model.refresh_weight_copy()
        opt = dict(meta["optimizer_state"])
        opt.update({k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")})
        self.optimizer.load_state_dict(opt)
        for bn in self.model.batchnorms:
            bn.eval_mean[...] = xp.asarray(arrays[f"bn.{bn.name}.eval_mean"])
            bn.eval_var[...] = xp.asarray(arrays[f"bn.{bn.name}.eval_var"])
        self.global_step = self.saved_step = self.bn_synced_at = int(meta["global_step"])
        self.saved_path = path
        # OpenBLAS's sums depend on its thread count, and BN's on the images per rank: the run
        # goes on from the same state, but its trajectory is not the uninterrupted one's.
        changed = [f"{what} {meta[key]} -> {now}" for key, what, now in (
            ("world_size", "ranks", self.world), ("batch_per_rank", "images per rank", self.args.batch_per_rank),
            ("blas_threads", "BLAS threads per rank", self.threads)) if key in meta and meta[key] != now]
        if changed:
            self.progress.message(f"note: this job continues the run with {', '.join(changed)}: the same data, "
                                  f"schedule and state, but not bit for bit the trajectory of the same split")
        self.progress.message(f"resumed from {path} at step {self.global_step} "
                              f"(epoch {self.global_step / self.steps_per_epoch:.2f})")

    # ---- training ------------------------------------------------------------------------------

    def train_step(self, batch, coef):
        """Enqueue one step on this rank's shard; returns its (mean loss, top-1 hits), both
        left on the device (see engine.stepstats for reading them)."""
        if self.graphed is not None:
            out = self.graphed(batch, coef)
        else:
            out = self._step(self.backend.asarray(batch.images), self.backend.asarray(batch.labels), coef)
        self._steps_run += 1
        if self._steps_run == 1:
            self._say_conv_notes()
        return out

    def _step(self, images, labels, coef):
        """The step on a batch already on the device (what --cuda-graph captures)."""
        from engine.loss import softmax_cross_entropy_with_hits
        from engine.transforms import normalize
        be, tl, model = self.backend, self.timeline, self.model
        with tl.span("forward", "forward"):
            x = normalize(images, self.train_set.mean, self.train_set.std, be.xp, model.input_dtype)
            logits = model.forward(x, train=True)
            loss, dlogits, hits = softmax_cross_entropy_with_hits(logits, labels, self.args.label_smoothing)
        with tl.span("backward", "backward"):
            model.backward(dlogits, grad_ready=self.reducer.grad_ready)
        # Each bucket's update runs as soon as its all-reduce lands (on a GPU, one update after
        # the last: engine.reducer's update_once); 1/N folded into grad_scale.
        reduced, opt, scale = self.reducer.reduced, self.optimizer, self.grad_scale
        self.reducer.finish(update=lambda a, b: opt.update(reduced, a, b, coef=coef, grad_scale=scale))
        return loss, hits

    def _report(self, pending: int = 0) -> None:
        """Read the global loss and top-1 of all but the `pending` newest steps, stop on a
        non-finite loss (at the same step on every rank), and report them."""
        from engine.metrics import check_finite
        while len(self.stats) > pending:
            r = self.stats.pop()
            check_finite(r["loss"], r["step"], r["epoch"])
            self.progress.train(r)

    def evaluate(self) -> dict:
        from engine.evaluate import evaluate
        self._sync_bn_stats()
        r = evaluate(self.model, self.comm, self.val_loader, self.val_set, self.args.batch_per_rank, self.backend,
                     sync_bn=False)
        self._evaluations += 1
        if self._evaluations == 1:
            self._say_conv_notes()
        r.update(step=self.global_step, epoch=self.global_step / self.steps_per_epoch)
        self.progress.eval(r)
        return r

    def run(self) -> dict | None:
        """Train to the end, or until a stop signal; the final evaluation's result, or None if
        the run was already complete or was stopped (then exit_status says so)."""
        a = self.args
        self.progress.message(self.describe())
        self.progress.message(f"run {self.run_name}: metrics in {a.log_dir}, checkpoints in "
                              f"{'(none)' if a.no_checkpoint else a.checkpoint_dir}")
        if a.epochs < SHORT_RUN_EPOCHS:
            self.progress.message(short_schedule_note(a.epochs))
        if self.resume_from:
            self.load_checkpoint(self.resume_from)
        self.progress.start(self.global_step, self.world, self.resume_from and self.resume_from["path"])
        if self.global_step >= self.stop_step:
            self.progress.message(f"run {self.run_name} is complete: its checkpoint is at step {self.global_step} "
                                  f"and this job would stop at step {self.stop_step}; nothing to do")
            return None
        eval_interval = max(1, round(a.eval_every * self.steps_per_epoch)) if a.eval_every > 0 else None
        ckpt_interval = a.checkpoint_every or None
        window, result, t_start = [], None, time.perf_counter()
        while self.global_step < self.stop_step and not self.stopped_by:
            epoch, first = divmod(self.global_step, self.steps_per_epoch)
            t_prev = time.perf_counter()
            waited = self.loader.wait_s
            for step, batch in self.loader.train_batches(self.sampler, epoch, first):
                epoch_f = self.global_step / self.steps_per_epoch
                coef = self.coefficients(epoch_f)
                self.timeline.begin_step(self.global_step)
                loss, hits = self.train_step(batch, coef)
                figures = self.timeline.end_step()
                self.global_step += 1
                now = time.perf_counter()
                window = (window + [now - t_prev])[-a.print_every:]
                record = dict(
                    epoch=self.global_step / self.steps_per_epoch, step=self.global_step,
                    total_steps=self.total_steps, lr=coef.eta, a_sgd=coef.a_sgd,
                    a_rms=coef.a_rms, images_per_s=self.sampler.global_batch * len(window) / sum(window),
                    step_s=window[-1], data_wait_s=self.loader.wait_s - waited)
                if figures is not None:
                    record.update(exposed_comm_s=figures["exposed_s"], comm_s=figures["comm_s"])
                t_prev, waited = now, self.loader.wait_s
                self.stats.submit(record, loss, hits, len(batch.labels))
                self.stopped_by, due = self.control.poll()     # the same answers on every rank
                checkpoint = due or self.stopped_by or (ckpt_interval and self.global_step % ckpt_interval == 0)
                evaluation = eval_interval and self.global_step % eval_interval == 0
                # The previous step's numbers; all of them before a checkpoint or an
                # evaluation, so a non-finite loss stops the job before either.
                self._report(pending=0 if checkpoint or evaluation else 1)
                if checkpoint:
                    with self.signals.protect_save() if self.stopped_by else contextlib.nullcontext():
                        self.save_checkpoint()
                        if self.stopped_by:     # every rank waits, a second signal deferred, until the file is durable
                            self.control.comm.Barrier()
                if self.stopped_by:
                    break
                if evaluation:
                    result = self.evaluate()
                    t_prev = time.perf_counter()
                if self.global_step >= self.stop_step:
                    break
        self._report()
        if self.stopped_by:
            self._report_stop()
            return None
        if result is None or result["step"] != self.global_step:
            result = self.evaluate()
        if self.saved_step != self.global_step:
            self.save_checkpoint()
        done = (f"done: {self.global_step} steps in {time.perf_counter() - t_start:.1f} s, "
                f"validation top-1 {100 * result['top1']:.2f}% top-5 {100 * result['top5']:.2f}%")
        if self.saved_step != self.global_step and self.rank == 0 and not a.no_checkpoint:
            self.exit_status = 1        # trained, but the model is not on disk: the status and the last line say so
            newest = (f"the newest saved is {self.saved_path} (step {self.saved_step})" if self.saved_path
                      else "no checkpoint of this job was saved")
            done += (f"; the final model is NOT saved: saving {self._checkpoint_path()} failed ({self.save_error}); "
                     f"{newest}")
        self.progress.message(done)
        return result

    def _report_stop(self) -> None:
        """One line: why the job stopped, where the work is, the command that continues it."""
        from engine.control import signal_name
        from engine.guard import STOPPED_EXIT_CODE
        self.exit_status = STOPPED_EXIT_CODE
        cause = ("its output pipe closed (SIGPIPE)" if self.stopped_by == signal.SIGPIPE
                 else signal_name(self.stopped_by))
        why = f"stopped by {cause} at step {self.global_step}/{self.total_steps}"
        if self.args.no_checkpoint:
            where = "no checkpoint (--no-checkpoint)"
        elif self.abandoned:
            where = f"{self.abandoned}; " + (f"the newest saved is {self.saved_path} (step {self.saved_step})"
                                              if self.saved_path else "this job saved no checkpoint")
        elif self.saved_path is None:
            where = "no checkpoint could be written"
        else:
            where = f"checkpoint {self.saved_path} (step {self.saved_step})"
        self.progress.message(f"engine.train: {why}; {where}; continue with: {resume_command(self.args.argv, self.world, self.run_name)}")

    def close(self) -> None:
        """Collective: every rank calls it (the watchdog's shutdown is a barrier)."""
        self.control.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        self.loader.close()         # also the validation loader: one worker pool serves both
        self.progress.close()
        self.timeline.close()
        self.comm.close()
        for lock in self.locks:
            lock.release()


# Below this many epochs the compressed 90-epoch recipe is too short to be stable here.
SHORT_RUN_EPOCHS = 6


def short_schedule_note(epochs: float) -> str:
    return (f"note: --epochs {epochs:g} compresses the recipe's 90 epochs {90 / epochs:.0f}x (the RMSprop warm-up "
            f"ends at epoch {12.5 * epochs / 90:.2f}); on the digits runs under {SHORT_RUN_EPOCHS} epochs are unstable "
            f"(--epochs 2 climbed to loss 8 and ended near 64%). --max-steps stops early without compressing.")


def resume_command(argv_in: list, world: int, run_name: str) -> str:
    """This job's command line with --resume auto --run-name NAME: what continues it."""
    argv, skip = [], False
    for arg in argv_in:
        if skip or arg.split("=")[0] in ("--resume", "--run-name"):
            skip = not skip and "=" not in arg
            continue
        argv.append(arg)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    launcher = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(world)] if world > 1 else []
    return shlex.join(launcher + [sys.executable, "-m", "engine.train", *argv, "--resume", "auto",
                                  "--run-name", run_name])


def launcher_rank() -> int:
    """This process's rank as the launcher set it, known before MPI starts (0 outside MPI)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def main(argv=None) -> int:
    rank = launcher_rank()
    # Every rank parses the same options: only rank 0 prints --help or a usage error.
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null if rank else sys.stdout), \
            contextlib.redirect_stderr(null if rank else sys.stderr):
        args = parse_args(argv)
    from engine import guard, rundir
    from engine.errors import EngineError
    from mpi4py import MPI  # noqa: F401  MPI_Init first: UCX takes SIGHUP (its debug signal) there
    if rank == 0:
        from engine.metrics import write_past_the_launcher
        write_past_the_launcher()       # a broken `| tee` is then this rank's to handle, not hydra's death
    signals = guard.StopSignals(None if rank else "engine.train: stopping at the next step with a checkpoint (the "
                                                    "same signal again: stop at once, or during that save: after it)")
    signals.install()
    guard.install()   # an exception on any rank, in any thread, ends the whole job
    trainer = None
    try:
        trainer = Trainer(args, signals)
        trainer.run()
    except EngineError as e:
        # The user's input, the run or the machine (engine.errors): the message says it all,
        # no traceback. One that every rank met alike (collective) is said once, by rank 0; a
        # refusal of that kind (usage: an option, the data, a run directory, a checkpoint)
        # leaves every rank together, exit status 2, with nothing collective pending. Any
        # other is this rank's, or a failure of the run: it ends the whole job, exit status 1.
        if e.usage and e.collective:
            if rank == 0:
                print(f"engine.train: {e}", file=sys.stderr, flush=True)
            return 2
        guard.abort_job(f"engine.train: {e}", quiet=rank != 0 and e.collective)
    except OSError as e:
        if not rundir.is_environment_error(e):
            raise
        # The machine, not the code: a full or read-only disk, a quota, a broken pipe.
        guard.abort_job(f"engine.train: {e}")
    trainer.close()
    return trainer.exit_status


if __name__ == "__main__":
    sys.exit(main())
