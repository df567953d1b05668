"""FID and Inception Score through torch-fidelity, with random Inception weights the tests write
(nothing is downloaded), and the image path of the CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import md4
from image_fixtures import synthetic_images, write_cifar10, write_random_inception_weights
from lightning_md4 import fidelity
from lightning_md4.fidelity import FidelityError, UInt8Images, fid_and_inception_score, inception_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def images(num: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(synthetic_images(num, 32, 10, seed)[0]).view(num, 3, 32, 32)


def features(weights: Path, x: torch.Tensor, layer: str) -> np.ndarray:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", [layer], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return net(x)[0].double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the textbook formula."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


@pytest.mark.slow
def test_fid_is_zero_for_identical_sets_and_the_frechet_distance_otherwise(weights, tmp_path):
    real, other = images(8, 0), images(8, 1)
    shifted = (real.int() + 60).clamp(0, 255).to(torch.uint8)
    kwargs = dict(weights=weights, cache_root=tmp_path / "cache", feature_layer_fid="64", isc=False, cuda=False,
                  verbose=False)
    same = fid_and_inception_score(real, UInt8Images(real), "ref", **kwargs)["fid"]
    far = fid_and_inception_score(shifted, UInt8Images(real), "ref", **kwargs)["fid"]
    near = fid_and_inception_score(other, UInt8Images(real), "ref", **kwargs)["fid"]
    feats_real, feats_shifted, feats_other = np.split(features(weights, torch.cat([real, shifted, other]), "64"), 3)
    assert abs(same) < 1e-6 * far
    assert far == pytest.approx(frechet(feats_shifted, feats_real), rel=1e-3)
    assert near == pytest.approx(frechet(feats_other, feats_real), rel=1e-3)
    assert far > near > 0


@pytest.mark.slow
def test_reference_statistics_are_cached_per_reference_size_and_weights(weights, tmp_path):
    real, samples = images(8, 0), images(8, 1)
    kwargs = dict(weights=weights, cache_root=tmp_path, feature_layer_fid="64", isc=False, cuda=False, verbose=False)
    first = fid_and_inception_score(samples, UInt8Images(real), "cifar10-abc", **kwargs)["fid"]
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert any("cifar10-abc-n8-w" in name and "stat-fid-64" in name for name in cached)

    class Unreadable(UInt8Images):
        def __getitem__(self, index):
            raise AssertionError("the reference was read again despite its cached statistics")

    assert fid_and_inception_score(samples, Unreadable(real), "cifar10-abc", **kwargs)["fid"] == first


@pytest.mark.slow
def test_inception_score_is_exp_of_the_mean_kl_to_the_marginal(weights, tmp_path):
    x = images(2, 3)
    out = fid_and_inception_score(x, UInt8Images(images(2, 0)), "ref", weights, tmp_path, feature_layer_fid="64",
                                  isc_splits=1, cuda=False, verbose=False)
    logits = torch.from_numpy(features(weights, x, "logits_unbiased"))
    p = logits.softmax(-1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(-1).mean()
    assert out["inception_score"] == pytest.approx(float(kl.exp()), rel=1e-6)
    assert out["inception_score_std"] == 0.0


def test_weights_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FidelityError, match="nowhere.pth does not exist.*--inception_weights"):
        inception_weights(tmp_path / "nowhere.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(FidelityError, match="not torch-fidelity's InceptionV3"):
        inception_weights(wrong)

    def offline(url, dst, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FidelityError, match="could not download.*unreachable.*--inception_weights PATH"):
        inception_weights(None)


def test_isc_splits_need_enough_samples():
    with pytest.raises(FidelityError, match="at least 20 samples"):
        fidelity.check_isc_splits(12, 10)


TINY_CONFIG = """
seed_everything: 0
trainer:
  default_root_dir: {run}
  max_steps: 2
  precision: 32-true
  val_check_interval: 2
  check_val_every_n_epoch: null
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {run}, name: tensorboard, version: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, save_last: true}}
    - class_path: lightning_md4.callbacks.SampleLogger
      init_args: {{num_samples: 4, steps: 2, grid: cosine, guidance: 1.0}}
model:
  class_path: lightning_md4.modules.MD4
  init_args:
    network: {{kind: unet, channels: 8, res_blocks: 1, embed_dim: 2, dropout: 0.0, num_classes: 10}}
    optim: {{lr: 1.0e-3, warmup_steps: 1}}
data:
  class_path: datamodules.CIFAR10DataModule
  init_args: {{path: {data}, batch_size: 4}}
"""


@pytest.mark.slow
def test_cifar_format_run_trains_reports_bpd_samples_and_computes_fid(weights, tmp_path):
    data, run = write_cifar10(tmp_path / "cifar", per_batch=4, num_test=4), tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(run=run, data=data))
    md4("fit", "--config", str(config), cwd=tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"]  # class-conditional, guided sample grid during validation
    last = run / "checkpoints" / "last.ckpt"
    out = md4("test", "--config", str(config), "--ckpt_path", str(last), cwd=tmp_path)
    assert "MD4 on CIFAR10DataModule test:" in out.stdout and "bits per dimension" in out.stdout
    out = md4("evaluate-samples", "--config", str(ROOT / "configs" / "fid.yaml"), "--ckpt_path", str(last),
              "--num_samples", "3", "--steps", "2", "--batch_size", "2", "--guidance", "0.5", "--reference_size", "2",
              "--feature_layer_fid", "64", "--isc_splits", "1", "--inception_weights", str(weights),
              "--cache_root", str(tmp_path / "fid_cache"), "--output", str(tmp_path / "eval.json"), cwd=tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "eval.png").stat().st_size > 0 and "FID" in out.stdout
    assert result["num_samples"] == 3 and result["guidance"] == 0.5 and result["reference_size"] == 2
    assert np.isfinite(result["fid"]) and result["inception_score"] >= 1.0 - 1e-9
