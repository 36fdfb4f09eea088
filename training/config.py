"""A run's settings, decided once: each script hands its parsed command line to one ``resolve_*``
function here, at the start, and from then on only reads the result; the ``*_of`` functions cut it
into the typed settings each component takes (``training.settings``), so a library function is
handed what it reads and never the whole.

What is decided here and nowhere else: the launch (rank, number of processes, device, precision),
the defaults that depend on other flags (the data set, the log folder, the number of classes), the
image settings a starting checkpoint records (``--in_chans``, ``--mean``/``--std``), the effective
batch and the lr from ``--blr``, and the fixed value of every setting a script has no flag for.
Every check that refuses a command line runs here too, before anything is built or written. What a
resumed checkpoint settles (the epoch and step to continue from) is the loop's
(``training.resume.resume_training_state``), since every rank must load the same one.
"""
import argparse
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import utils
from datasets import Loading, check_rgb, count_classes, require_data_path, require_eval_data_path
from evaluation.online import OnlineSettings
from evaluation.setup import Encoder, EvalLoading, LabelledData
from image_data.augmentation import RGB
from image_data.shard_cache import CacheSettings, cache_settings
from image_data.shard_names import is_shard_spec, shard_paths
from optim_factory import OptimizerSettings
from training import precision
from training.checkpoint import Checkpointing
from training.cli import one_size
from training.config_file import resolved_config, write_config
from training.loop import Stepping, TrainingSettings
from training.hub import resolve_checkpoint
from training.lr_schedule import Schedule
from training.preemption import Stopping
from training.resume import ORDER_FLAGS, Resuming
from training.settings import pick, validate_numbers
from training.trackers import Tracking, check_trackers
from training.weight_files import read_args
from training.wrapping import Wrapping
from utils import ProcessGroup, UsageError


class ResolvedArgs(argparse.Namespace):
    """The settings of a run once resolved: read them, never assign them."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"args.{name} is settled once by training.config; it is read only afterwards")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"args.{name} is settled once by training.config; it is read only afterwards")


def frozen(values: Mapping[str, Any]) -> ResolvedArgs:
    resolved = ResolvedArgs.__new__(ResolvedArgs)
    resolved.__dict__.update(values)
    return resolved


# ----------------------------------------------------------------------------- the parts


def launch_values(args: argparse.Namespace) -> Dict[str, Any]:
    """Rank, processes and precision: ``--amp`` defaults to bf16 on GPUs that have it, else none."""
    utils.check_device(args.device)
    launch = utils.launch_env(args.local_rank)
    return {"rank": launch.rank, "world_size": launch.world_size, "local_rank": launch.local_rank,
            "distributed": launch.world_size > 1, "amp": precision.resolve_amp(args.amp, torch.device(args.device))}


def image_values(args: argparse.Namespace, saved: Mapping[str, Any]) -> Dict[str, Any]:
    """``--input_size`` as ``one_size``; ``--in_chans`` from the command line, else ``saved`` (the
    starting checkpoint's args), else RGB; ``--mean``/``--std`` from the command line, else (channel
    counts other than RGB) the checkpoint's, else ImageNet's for RGB. One value per channel."""
    saved_chans = saved.get("in_chans", RGB)
    in_chans = saved_chans if args.in_chans is None else args.in_chans
    if in_chans != saved_chans and saved:
        raise UsageError(f"--in_chans {args.in_chans}, but the checkpoint was trained on {saved_chans} channel(s); "
                         "leave --in_chans out to take the checkpoint's")
    settings = {"input_size": one_size(args.input_size), "in_chans": in_chans}
    for name, default in (("mean", IMAGENET_DEFAULT_MEAN), ("std", IMAGENET_DEFAULT_STD)):
        value = getattr(args, name)
        if value is None:
            value = saved.get(name) if in_chans != RGB else list(default)
        if value is None:
            raise UsageError(f"--in_chans {in_chans} needs --mean and --std of {in_chans} values each: "
                             "your images' per-channel mean and std, in [0, 1]")
        if len(value) != in_chans:
            raise UsageError(f"--{name} has {len(value)} value(s) for --in_chans {in_chans}")
        settings[name] = value
    if "crop_scale" in vars(args) and args.crop_scale[0] > args.crop_scale[1]:
        raise UsageError(f"--crop_scale takes MIN MAX, got {args.crop_scale[0]:g} {args.crop_scale[1]:g}")
    return settings


def starting_args(path: str) -> Dict[str, Any]:
    """The args of the checkpoint a run starts from (``--finetune``, ``--init_from``), if it exists."""
    return read_args(Path(path)) if path and Path(path).exists() else {}


def training_values(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """The log folder, and ``lr = blr * effective batch / 256`` unless ``--lr`` is given, as in MAE."""
    validate_numbers(args)
    stopping_of(args)  # the signals and --requeue check themselves
    check_trackers(tuple(args.report_to))
    eff_batch_size = args.batch_size * args.accum_iter * world_size
    log_dir = args.log_dir
    if log_dir is None and args.output_dir:
        log_dir = str(Path(args.output_dir) / "tensorboard")
    return {"eff_batch_size": eff_batch_size, "lr": args.blr * eff_batch_size / 256 if args.lr is None else args.lr,
            "log_dir": log_dir}


def check_data_path(path: str, flag: str) -> bool:
    """A folder, or tar shards that all exist (``image_data.shards``); True for shards."""
    if is_shard_spec(path):
        shard_paths(path)
        return True
    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path} is neither a directory nor tar shards")
    return False


def labelled_data_values(args: argparse.Namespace, *, train: bool) -> Dict[str, Any]:
    """The evaluations' labelled data (``labelled_values``) and the ``--finetune`` checkpoint."""
    if args.finetune and not Path(args.finetune).exists():
        raise UsageError(f"--finetune {args.finetune} does not exist; check the path")
    return labelled_values(data_set=args.data_set, data_path=args.data_path, eval_data_path=args.eval_data_path,
                           nb_classes=args.nb_classes, index_dir=args.output_dir, cache=shard_cache_of(args),
                           train=train)


def labelled_values(*, data_set: Optional[str], data_path: Optional[str], eval_data_path: Optional[str],
                    nb_classes: Optional[int], index_dir: Optional[str], cache: Optional[CacheSettings],
                    train: bool) -> Dict[str, Any]:
    """The data set (IMNET with a ``--data_path`` folder, image_folder with shards, synthetic
    without), its paths, and ``--nb_classes``. For folders it defaults to the evaluation data's
    count and must match it when given, and with ``train`` the training data must have as many
    classes; for tar shards, whose labels are numbers, it defaults to the largest label + 1 of
    either split and may be larger."""
    shards = bool(data_path) and check_data_path(data_path, "--data_path")
    data_set = data_set or ("image_folder" if shards else "IMNET" if data_path else "synthetic")
    try:
        require_data_path(data_set, data_path)
        require_eval_data_path(data_set, eval_data_path)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if data_set == "image_folder":
        shards = check_data_path(eval_data_path, "--eval_data_path") or shards
    try:
        counted, train_classes = (count_classes(data_set, is_train, data_path=data_path,
                                                eval_data_path=eval_data_path, index_dir=index_dir, cache=cache)
                                  for is_train in (False, train))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    if shards:
        counted = max(counted, train_classes)
        if nb_classes is not None and nb_classes < counted:
            raise UsageError(f"--nb_classes {nb_classes}, but the shards hold labels up to {counted - 1}; "
                             f"pass --nb_classes {counted} or more, or leave it out")
        return {"data_set": data_set, "nb_classes": nb_classes or counted, "shards": True}
    if train_classes != counted:
        raise UsageError(f"the training data has {train_classes} classes but the evaluation data {counted}; "
                         "both need the same class folders")
    if nb_classes is not None and nb_classes != counted:
        raise UsageError(f"--nb_classes {nb_classes} does not match the {counted} classes of --data_set "
                         f"{data_set}; pass --nb_classes {counted} or leave it out")
    return {"data_set": data_set, "nb_classes": counted, "shards": False}


ONLINE_FLAGS = {"data_set": "eval_data_set", "data_path": "eval_data_path", "eval_data_path": "eval_val_path"}


def online_eval_values(args: argparse.Namespace, in_chans: int) -> Dict[str, Any]:
    """The labelled set pretraining evaluates on (``--eval_data_set``, ``--eval_data_path``,
    ``--eval_val_path``: what ``run_knn_eval.py`` reads as ``--data_set``, ``--data_path`` and
    ``--eval_data_path``), settled as the evaluation scripts settle theirs, in the words of these flags."""
    if not (args.eval_data_set or args.eval_data_path):
        if args.eval_val_path:
            raise UsageError("--eval_val_path names the validation split of --eval_data_path, which is missing")
        return {"eval_data_set": None, "eval_nb_classes": None, "eval_shards": False}
    if args.eval_data_set not in (None, "synthetic") and not args.eval_data_path:
        raise UsageError(f"--eval_data_set {args.eval_data_set} needs --eval_data_path; --eval_data_set synthetic "
                         "evaluates on the built-in labelled set")
    try:
        found = labelled_values(data_set=args.eval_data_set, data_path=args.eval_data_path,
                                eval_data_path=args.eval_val_path, nb_classes=None, index_dir=args.output_dir,
                                cache=shard_cache_of(args),
                                train=True)
        if found["data_set"] in ("synthetic", "CIFAR10", "CIFAR100"):
            check_rgb(found["data_set"], in_chans)
    except (UsageError, ValueError) as error:
        renamed = re.sub(r"--(data_set|data_path|eval_data_path)\b", lambda flag: f"--{ONLINE_FLAGS[flag[1]]}",
                         str(error))
        raise UsageError(renamed) from error
    return {"eval_data_set": found["data_set"], "eval_nb_classes": found["nb_classes"], "eval_shards": found["shards"]}


def resolved(args: argparse.Namespace, *parts: Mapping[str, Any], **fixed: Any) -> ResolvedArgs:
    """The command line with ``parts`` decided over it; ``fixed``: settings this script has no flag for."""
    values = {**fixed, **vars(args)}
    for part in parts:
        values.update(part)
    settled = frozen(values)
    validate_numbers(settled)  # the values taken from a checkpoint too
    wrapping_of(settled)  # --fsdp with the precision
    return settled


# ----------------------------------------------------------------------------- one per script


def with_local_checkpoint(args: argparse.Namespace, flag: str) -> argparse.Namespace:
    """The command line with the checkpoint ``--{flag}`` names as a local path: a Hugging Face Hub
    name (``training.hub``) becomes its folder or file in the Hub cache."""
    return argparse.Namespace(**{**vars(args), flag: resolve_checkpoint(getattr(args, flag), f"--{flag}")})


def resolve_pretraining(args: argparse.Namespace) -> ResolvedArgs:
    """``run_mae_pretraining.py``'s settings."""
    args = with_local_checkpoint(args, "init_from")
    images = image_values(args, starting_args(args.init_from))
    launch = launch_values(args)
    training = training_values(args, launch["world_size"])
    data_set = args.data_set or ("image_folder" if args.data_path else "synthetic")
    try:
        require_data_path(data_set, args.data_path)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if args.data_path:
        check_data_path(args.data_path, "--data_path")
    if args.init_from and not Path(args.init_from).exists():
        raise UsageError(f"--init_from {args.init_from} does not exist; check the path")
    return resolved(args, launch, images, training, {"data_set": data_set},
                    online_eval_values(args, images["in_chans"]))


def resolve_classification(args: argparse.Namespace, **fixed: Any) -> ResolvedArgs:
    """Finetuning's and the linear probe's settings; ``fixed`` for the flags the probe has not."""
    args = with_local_checkpoint(args, "finetune")
    images = image_values(args, starting_args(args.finetune))
    launch = launch_values(args)
    training = training_values(args, launch["world_size"])
    return resolved(args, launch, images, training, labelled_data_values(args, train=not args.eval), **fixed)


def resolve_knn(args: argparse.Namespace) -> ResolvedArgs:
    """``run_knn_eval.py``'s settings: no training, so no schedule, checkpoints or sharding."""
    args = with_local_checkpoint(args, "finetune")
    data = labelled_data_values(args, train=True)
    images = image_values(args, starting_args(args.finetune))
    validate_numbers(args)
    return resolved(args, data, images, launch_values(args), fsdp=False, eval=False)


def resolve_visualization(args: argparse.Namespace, saved: Mapping[str, Any]) -> ResolvedArgs:
    """``run_mae_vis.py``'s settings: what the command line leaves open comes from the checkpoint's
    args (``saved``), then the defaults."""
    defaults = {"model": "pretrain_mae_base_patch16_224", "input_size": 224, "norm_pix_loss": False, "in_chans": 3}
    settings = {name: saved.get(name, default) if getattr(args, name) is None else getattr(args, name)
                for name, default in defaults.items()}
    settings["input_size"] = one_size(settings["input_size"])
    settings["patch_size"] = saved.get("patch_size") if args.patch_size is None else args.patch_size
    mean, std = saved.get("mean"), saved.get("std")
    if mean is None and settings["in_chans"] == RGB:
        mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    if mean is None or len(mean) != settings["in_chans"]:
        raise UsageError(f"the checkpoint gives no mean and std for its {settings['in_chans']} channel(s): pass one "
                         "written by our pretraining, which records them")
    validate_numbers(args)
    return frozen({**vars(args), **settings, "mean": mean, "std": std})


# ----------------------------------------------------------------------------- each component's part


def plain_record(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's settings as plain Python values: the flat ``args`` every checkpoint stores, so it
    loads with ``weights_only`` and a resume can compare with it."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return str(value)

    return {key: plain(value) for key, value in vars(args).items()}


def save_run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``run_config`` written as ``OUTPUT_DIR/config.yaml`` (a collective), for a script without the
    loop, which writes it once the checkpoint to resume from is read."""
    write_config(args.output_dir, run_config(args, parser))


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The YAML of ``OUTPUT_DIR/config.yaml`` (``training.config_file``): every flag as resolved,
    where ``lr`` (from ``--blr``) and the TensorBoard folder (from ``--output_dir``) are comments
    when they were derived, so that ``--config`` with another ``--blr`` or folder derives them anew."""
    derived = {}
    if "blr" in vars(args) and args.lr == args.blr * args.eff_batch_size / 256:
        derived["lr"] = f"blr x effective batch {args.eff_batch_size} / 256"
    if args.output_dir and getattr(args, "log_dir", None) == str(Path(args.output_dir) / "tensorboard"):
        derived["log_dir"] = "output_dir/tensorboard"
    return resolved_config(parser, plain_record(args), derived)


def process_group_of(args: argparse.Namespace) -> ProcessGroup:
    """How the script joins its run's processes (``utils.run_distributed``)."""
    return ProcessGroup(device=args.device, local_rank=args.local_rank, group_of_one=args.fsdp,
                        timeout_minutes=args.dist_timeout)


def pinned(args: argparse.Namespace) -> bool:
    """``--pin_mem``, which only a GPU run uses."""
    return args.pin_mem and args.device != "cpu"


def stopping_of(args: argparse.Namespace) -> Stopping:
    return pick(Stopping, vars(args), preempt_signals=tuple(args.preempt_signals))


def loading_of(args: argparse.Namespace) -> Loading:
    return pick(Loading, vars(args), pin_mem=pinned(args), preempt_signals=tuple(args.preempt_signals))


def eval_loading_of(args: argparse.Namespace) -> EvalLoading:
    return pick(EvalLoading, vars(args), pin_mem=pinned(args), split=args.dist_eval and args.distributed,
                preempt_signals=tuple(args.preempt_signals))


def optimizer_of(args: argparse.Namespace) -> OptimizerSettings:
    return pick(OptimizerSettings, vars(args))


def wrapping_of(args: argparse.Namespace) -> Wrapping:
    return pick(Wrapping, vars(args))


def encoder_of(args: argparse.Namespace) -> Encoder:
    return pick(Encoder, vars(args))


def shard_cache_of(args: argparse.Namespace) -> Optional[CacheSettings]:
    """Where shards in object storage are read from (``image_data.shard_cache``)."""
    return cache_settings(shard_cache=args.shard_cache, output_dir=args.output_dir,
                          shard_cache_gb=args.shard_cache_gb, shard_retries=args.shard_retries)


def labelled_data_of(args: argparse.Namespace) -> LabelledData:
    return pick(LabelledData, vars(args), cache=shard_cache_of(args))


def online_of(args: argparse.Namespace) -> OnlineSettings:
    return pick(OnlineSettings, vars(args), mean=tuple(args.mean), std=tuple(args.std), sharded=args.fsdp,
                preempt_signals=tuple(args.preempt_signals))


def online_data_of(args: argparse.Namespace) -> LabelledData:
    """The labelled set pretraining evaluates on, as ``online_eval_values`` settled it."""
    return LabelledData(data_set=args.eval_data_set, nb_classes=args.eval_nb_classes, input_size=args.input_size,
                        in_chans=args.in_chans, data_path=args.eval_data_path, eval_data_path=args.eval_val_path,
                        shards=args.eval_shards, num_samples=args.eval_num_samples,
                        max_image_pixels=args.max_image_pixels, output_dir=args.output_dir,
                        cache=shard_cache_of(args))


def resuming_of(args: argparse.Namespace) -> Resuming:
    """What choosing and reading a checkpoint to resume compares with: ``ORDER_FLAGS`` the script has."""
    values = vars(args)
    return pick(Resuming, values, order={flag: values[flag] for flag in ORDER_FLAGS if flag in values})


def training_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainingSettings:
    """``training.loop.fit``'s settings: the schedule, the steps, checkpointing (with the record every
    checkpoint stores and the run's ``config.yaml``), resuming, stopping and the trackers (which log
    the same record)."""
    values, record = vars(args), plain_record(args)
    return TrainingSettings(
        schedule=pick(Schedule, values), stepping=pick(Stepping, values),
        checkpointing=pick(Checkpointing, values, record=record, config_yaml=run_config(args, parser)),
        resuming=resuming_of(args),
        stopping=stopping_of(args),
        tracking=pick(Tracking, values, report_to=tuple(args.report_to), config=record),
    )
