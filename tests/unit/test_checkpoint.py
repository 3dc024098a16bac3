"""The one checkpoint protocol (common.networks.checkpoint) and the one save-best handler."""

from __future__ import annotations

import types

import pytest
import torch
from monai.networks.nets import UNet

from common.engines import SaveBestCheckpoint
from common.networks import load_network, read_checkpoint, release_checkpoint, save_network
from common.networks.checkpoint import FORMATS, for_inference, restore_network


def _unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=1)


def test_every_trained_network_type_registers_its_format():
    from common.networks import LungCLIP
    from common.networks.hsam import HSam

    assert FORMATS[LungCLIP.checkpoint_format] is LungCLIP and FORMATS[HSam.checkpoint_format] is HSam


def test_a_plain_module_saves_its_state_dict_and_restores_onto_its_architecture(tmp_path):
    trained, fresh = _unet(0), _unet(1)
    x = torch.rand(1, 1, 16, 16)
    assert not torch.allclose(trained.eval()(x), fresh.eval()(x))
    path = save_network(trained, tmp_path / "unet.pt", preprocessing={"slice_size": 16}, extra={"epoch": 3})
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == "state_dict" and ckpt["network"] == "UNet"
    assert ckpt["preprocessing"] == {"slice_size": 16} and ckpt["extra"] == {"epoch": 3}
    loaded = load_network(path, network=fresh)
    assert loaded is fresh and torch.allclose(trained(x), loaded.eval()(x))
    with pytest.raises(ValueError, match="unet.pt.*does not say how to build its network"):
        load_network(path)  # a state dict needs the architecture its config builds


def test_release_is_float16_and_loads_back_close(tmp_path):
    trained = _unet(0)
    path = save_network(trained, tmp_path / "release.pt", release=True)
    ckpt = read_checkpoint(path)
    assert ckpt["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    loaded = load_network(path, network=_unet(1)).eval()
    x = torch.rand(1, 1, 16, 16)
    assert next(loaded.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert float((trained.eval()(x) - loaded(x)).abs().max()) < 1e-2


def test_release_checkpoint_of_a_state_dict_needs_its_architecture(tmp_path):
    path = save_network(_unet(0), tmp_path / "unet.pt")
    with pytest.raises(ValueError, match="does not say how to build"):
        release_checkpoint(path, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_bad_files_are_clear_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt: network checkpoint not found"):
        load_network(tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt: cannot be read as a PyTorch checkpoint"):
        load_network(tmp_path / "text.pt")
    torch.save({"model": {}}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt: not a network checkpoint of this project .no format tag"):
        load_network(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt: not a LungCLIP checkpoint of this project"):
        load_network(tmp_path / "bare.pt", expect="LungCLIP")
    # a checkpoint of another network type onto this one
    path = save_network(_unet(0), tmp_path / "unet.pt")
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unet.pt: not a Linear checkpoint .it holds UNet"):
        restore_network(other, read_checkpoint(path), path)
    with pytest.raises(ValueError, match="unet.pt: not a HSam checkpoint .it holds UNet, format 'state_dict'"):
        load_network(path, expect="HSam")
    hsam_like = {"format": "hsam-trainable-v2", "model": {}}
    with pytest.raises(ValueError, match="x.pt: not a UNet checkpoint .it holds HSam"):
        restore_network(_unet(), hsam_like, "x.pt")


def test_for_inference_moves_and_sets_eval_mode():
    net = _unet().train()
    out = for_inference(net, "cpu")
    assert out is net and not net.training


def _engine(epoch: int, best_epoch: int, best: float):
    state = types.SimpleNamespace(
        epoch=epoch, best_metric_epoch=best_epoch, best_metric=best, key_metric_name="val_mean_dice"
    )
    return types.SimpleNamespace(state=state)


def test_save_best_writes_only_when_the_key_metric_improves(tmp_path):
    net = _unet(0)
    handler = SaveBestCheckpoint(net, tmp_path / "best.pt", preprocessing={"slice_size": 16})
    handler(_engine(epoch=1, best_epoch=1, best=0.5))
    first = read_checkpoint(tmp_path / "best.pt")
    assert first["extra"] == {"epoch": 1, "val_mean_dice": 0.5} and first["preprocessing"] == {"slice_size": 16}
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    handler(_engine(epoch=2, best_epoch=1, best=0.5))  # no better: the file keeps epoch 1's weights
    kept = read_checkpoint(tmp_path / "best.pt")
    assert kept["extra"]["epoch"] == 1
    assert all(torch.equal(kept["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])
    handler(_engine(epoch=3, best_epoch=3, best=0.7))
    assert read_checkpoint(tmp_path / "best.pt")["extra"] == {"epoch": 3, "val_mean_dice": 0.7}
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary name, nothing left behind


def test_save_best_gives_a_lung_clip_its_preprocessing(tiny_clip, tmp_path):
    model, _ = tiny_clip
    handler = SaveBestCheckpoint(model, tmp_path / "clip.pt", preprocessing={"hu_window": [-1000.0, 400.0]})
    handler(_engine(epoch=1, best_epoch=1, best=0.9))
    loaded = load_network(tmp_path / "clip.pt")
    assert loaded.preprocessing["hu_window"] == [-1000.0, 400.0] == model.preprocessing["hu_window"]
    assert loaded.preprocessing == model.preprocessing
