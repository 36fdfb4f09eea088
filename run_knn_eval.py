"""Weighted k-NN classification on frozen encoder features, as DINO evaluates.

The features of the training and evaluation sets are extracted once, split over the processes
(each sample on exactly one rank), gathered, L2-normalized, and each evaluation image is
classified by the temperature-weighted votes of its nearest training images for every k at once
(``evaluation.knn``).
``python run_knn_eval.py --model vit_tiny_patch16_224 --input_size 64 --finetune CKPT`` runs on
the synthetic dataset; without ``--finetune`` it evaluates a randomly initialized encoder.
"""
import argparse
import functools
import json
from typing import Dict

import torch

import utils
from training.cli import add_device_args
from evaluation.features import FEATURES, check_pixel_floor, extract_features, model_features, token_features
from evaluation.knn import NB_KNN, TEMPERATURE, knn_accuracy
from evaluation.setup import (
    add_data_args,
    add_encoder_args,
    build_datasets,
    build_encoder,
    load_finetune_weights,
    normalizing_batch_transform,
    unaugmented,
)
from training.config import encoder_of, labelled_data_of, process_group_of, resolve_knn
from training.config_file import ConfigArgumentParser
from training.output_dir import claim_output_dir

def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE k-NN evaluation", add_help=True)
    parser.add_argument("--batch_size", default=256, type=int, help="images per process per forward pass")
    add_encoder_args(parser, global_pool=False)
    knn = parser.add_argument_group("k-NN")
    knn.add_argument("--nb_knn", default=list(NB_KNN), type=int, nargs="+",
                     help="neighbour counts, all evaluated in one pass")
    knn.add_argument("--features", default=None, choices=FEATURES,
                     help="the cls token, the average of the patch tokens, both side by side, or the normalized "
                          "pixels without an encoder (the raw-pixel floor) (default: the encoder's output, the cls "
                          "token or with --global_pool the pooled patch tokens after fc_norm)")
    knn.add_argument("--temperature", default=TEMPERATURE, type=float, help="votes weigh exp(cosine similarity / T)")
    add_data_args(parser, trains=False)
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="./output_dir", type=str, help="log.txt gets the result as a JSON line")
    run.add_argument("--seed", default=0, type=int, help="initializes the encoder when there is no --finetune")
    add_device_args(run)
    return parser


def main(args: argparse.Namespace) -> Dict[str, object]:
    """Evaluate as ``args`` say; returns the JSON record it prints and logs."""
    args = resolve_knn(args)
    check_pixel_floor(features=args.features, finetune=args.finetune)
    return utils.run_distributed(functools.partial(run, args), process_group_of(args))


def run(args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    utils.seed_everything(args.seed)  # no rank: a random encoder must be the same on every rank
    train_set, val_set, nb_classes = build_datasets(
        labelled_data_of(args), unaugmented(input_size=args.input_size, in_chans=args.in_chans), train=True)
    model = build_encoder(encoder_of(args), num_classes=0)
    if args.finetune:
        load_finetune_weights(model, args.finetune)
    with claim_output_dir(args.output_dir, lock=False):  # only once the inputs are known good
        model.to(device)
        loading = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, amp=args.amp,
                       batch_transform=normalizing_batch_transform(mean=args.mean, std=args.std),
                       embed=token_features(args.features) if args.features else model_features)
        train_features, train_labels = extract_features(model, train_set, **loading)
        val_features, val_labels = extract_features(model, val_set, **loading)
        ks = sorted({min(k, len(train_set)) for k in args.nb_knn})  # k beyond the training set is all of it
        accuracy = knn_accuracy(train_features, train_labels, val_features, val_labels, nb_classes, ks,
                                args.temperature)
        record = {"knn_acc1": {str(k): value for k, value in accuracy.items()}, "temperature": args.temperature,
                  "num_train": len(train_set), "num_val": len(val_set), "model": args.model,
                  "finetune": args.finetune, "global_pool": args.global_pool,
                  "features": args.features or "model"}
        utils.append_log(args.output_dir, record)
        if utils.is_main_process():
            for k, value in accuracy.items():
                print(f"{k}-NN top-1 {value:.2f}% on {len(val_set)} images")
            print(json.dumps(record), flush=True)
        return record


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
