"""foundation_clip's multi_gpu_train.json overlay under torchrun: 2 CPU ranks (gloo) train the tiny model.

DDP keeps the ranks in step: after training, every parameter and buffer is identical on both ranks,
training changed them, the DistributedSampler split the training set between the ranks, and both
ranks validated the whole validation set to the same metrics (the same early-stopping decisions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BUNDLES, TINY_CLIP_OVERLAY

REPO = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLES / "foundation_clip" / "configs"
WORKER = Path(__file__).resolve().parent / "ddp_clip_worker.py"
NPROC = 2


@pytest.mark.timeout(300)
def test_two_rank_training_keeps_ranks_in_step(tiny_phantom_manifest, tiny_text_dir, tmp_path):
    out = tmp_path / "ranks"
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(TINY_CLIP_OVERLAY)]
    overrides = {
        "logging_file": "False",
        "bundle_root": str(BUNDLES / "foundation_clip"),
        "manifest": str(tiny_phantom_manifest),
        "text_model_dir": str(tiny_text_dir),
        "samples_dir": str(tmp_path / "samples"),
        "teacher_cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "models"),
        "max_epochs": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NPROC}",
        str(WORKER),
        str(out),
        "--config_file",
        repr(configs),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, whatever the machine has
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    log = f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
    assert proc.returncode == 0, log

    for r in range(NPROC):
        for name in (f"rank{r}.pt", f"rank{r}_init.pt", f"rank{r}.json"):
            assert (out / name).is_file(), f"{name} not written\n{log}"
    final = [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(NPROC)]
    init = [torch.load(out / f"rank{r}_init.pt", map_location="cpu", weights_only=True) for r in range(NPROC)]
    rec = [json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC)]

    # identical weights on every rank, buffers (BatchNorm running statistics) included
    assert set(final[0]) == set(final[1]) == set(init[0])
    differ = [k for k in final[0] if not torch.equal(final[0][k], final[1][k])]
    assert not differ, f"ranks disagree on {differ}"
    # DDP started every rank from rank 0's weights, and training moved them (W_i, W_t, temperature, ...)
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])
    changed = {k for k in final[0] if final[0][k].is_floating_point() and not torch.equal(final[0][k], init[0][k])}
    for key in ("image_projection.weight", "text_projection.weight", "logit_scale"):
        assert key in changed, f"{key} did not train; changed: {sorted(changed)}"
    assert any(k.startswith("distill_head.") for k in changed) and any(k.startswith("image_encoder.") for k in changed)

    for r, record in enumerate(rec):
        assert record["rank"] == r and record["world_size"] == NPROC and record["device"] == "cpu"
        assert record["sampler"] == "DistributedSampler" and record["epoch"] == 1 and record["iteration"] >= 1
    # each rank trained on its own half of the training set (DistributedSampler, padded to even shards)
    n = rec[0]["train_size"]
    shards = [r["train_indices"] for r in rec]
    assert len(shards[0]) == len(shards[1]) == -(-n // NPROC)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == NPROC * len(shards[0]) - n  # only the padding repeats
    assert rec[0]["iteration"] == rec[1]["iteration"]
    # every rank validated everything with the same model: same metrics, same best epoch
    assert rec[0]["val_metrics"] and rec[0]["val_metrics"] == rec[1]["val_metrics"]
    assert (
        rec[0]["val_best_metric"] == rec[1]["val_best_metric"]
        and rec[0]["val_best_metric_epoch"] == rec[1]["val_best_metric_epoch"]
    )
    # logging / TensorBoard / progress bar only on rank 0 (their `_disabled_: @is_not_rank0` in
    # train.json); every other handler on every rank
    rank0_only = {"StatsHandler", "TensorBoardStatsHandler", "ProgressBar", "_OutputHandler"}
    assert {"StatsHandler", "TensorBoardStatsHandler", "ProgressBar", "LrScheduleHandler", "ValidationHandler"} <= set(
        rec[0]["train_handlers"]
    ), rec[0]["train_handlers"]
    assert {"StatsHandler", "TensorBoardStatsHandler", "SaveBestCheckpoint", "EarlyStopHandler"} <= set(
        rec[0]["val_handlers"]
    ), rec[0]["val_handlers"]
    for engine in ("train_handlers", "val_handlers"):
        assert set(rec[1][engine]) == set(rec[0][engine]) - rank0_only, (rec[0][engine], rec[1][engine])
    events = list((tmp_path / "out").glob("events.out.tfevents.*"))
    assert events and len({f.name.split(".")[-2] for f in events}) == 1, (
        f"TensorBoard files from more than one process: {events}"
    )
    # the checkpoint (written by rank 0 only) is whole
    assert (tmp_path / "models" / "model.pt").is_file()
    assert not list((tmp_path / "models").glob("*.tmp*")) and not list((tmp_path / "cache").rglob("*.tmp"))
