"""One rank of a ``torchrun`` run of the foundation_clip bundle, as ``monai.bundle run`` runs it, plus a record of the result.

Usage (what ``tests/system/test_foundation_clip_ddp.py`` launches)::

    torchrun --standalone --nproc_per_node=2 tests/system/ddp_clip_worker.py OUT \
        --config_file "['bundles/foundation_clip/configs/train.json','bundles/foundation_clip/configs/multi_gpu_train.json', ...]" \
        --bundle_root bundles/foundation_clip --manifest ... --train#trainer#epoch_length 1

Like ``monai.bundle run`` it builds a :class:`monai.bundle.ConfigWorkflow` from the config files and the
``--id value`` overrides, runs ``initialize`` (which, through ``multi_gpu_train.json``, starts the
process group), ``run`` and ``finalize``. Around ``run`` it writes, for rank R:

- ``OUT/rank{R}_init.pt``: ``unwrap(network).state_dict()`` right after DistributedDataParallel wrapped it;
- ``OUT/rank{R}.pt``: the same after training;
- ``OUT/rank{R}.json``: world size, the trainer's iteration / epoch counts, this rank's training sample
  indices (from the sampler) and the evaluator's metrics, so a test can check the sharding and that
  every rank took the same validation (early-stopping) decisions.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def _value(text: str):
    """A command-line value as ``monai.bundle run`` (python-fire) would read it: a Python literal, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    if not argv or argv[0].startswith("--"):
        raise SystemExit("usage: ddp_clip_worker.py OUT --config_file \"['a.json','b.json']\" [--id value ...]")
    out, rest, args = Path(argv[0]), argv[1:], {}
    if len(rest) % 2:
        raise SystemExit(f"overrides come in '--id value' pairs, got {rest}")
    for key, value in zip(rest[::2], rest[1::2]):
        if not key.startswith("--"):
            raise SystemExit(f"expected --id, got {key!r}")
        args[key[2:]] = _value(value)
    return out, args


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from monai.bundle import ConfigWorkflow

    from common.networks.checkpoint import unwrap

    out, args = parse_args(argv)
    out.mkdir(parents=True, exist_ok=True)
    config_file = args.pop("config_file")
    workflow = ConfigWorkflow(config_file=config_file, workflow_type="train", **args)
    workflow.initialize()  # parses the config and runs "initialize": init_process_group
    if not dist.is_initialized():
        raise RuntimeError("the merged config's 'initialize' did not start a process group")
    rank = dist.get_rank()
    parser = workflow.parser
    network = parser.get_parsed_content("network")  # the same object "run" trains (the resolver caches it)
    if not isinstance(network, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(f"'network' is a {type(network).__name__}, not DistributedDataParallel")
    torch.save(
        {k: v.detach().cpu().clone() for k, v in unwrap(network).state_dict().items()}, out / f"rank{rank}_init.pt"
    )

    workflow.run()

    torch.save({k: v.detach().cpu().clone() for k, v in unwrap(network).state_dict().items()}, out / f"rank{rank}.pt")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    sampler = trainer.data_loader.sampler
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "device": str(parser.get_parsed_content("device")),
        "sampler": type(sampler).__name__,
        "train_indices": [int(i) for i in sampler],  # the last epoch's shard
        "train_size": len(trainer.data_loader.dataset),
        "iteration": int(trainer.state.iteration),
        "epoch": int(trainer.state.epoch),
        "train_handlers": sorted(
            {type(getattr(h, "__self__", h)).__name__ for hs in trainer._event_handlers.values() for h, _, _ in hs}
        ),
        "val_handlers": sorted(
            {type(getattr(h, "__self__", h)).__name__ for hs in evaluator._event_handlers.values() for h, _, _ in hs}
        ),
        "val_metrics": {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))},
        "val_best_metric": float(evaluator.state.best_metric),
        "val_best_metric_epoch": int(evaluator.state.best_metric_epoch),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2) + "\n")
    workflow.finalize()  # destroy_process_group


if __name__ == "__main__":
    main(sys.argv[1:])
