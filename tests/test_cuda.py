"""Training on a CUDA GPU (skipped where PyTorch sees none): the same code path as on the CPU,
the fitted model back on the CPU, checkpoints that resume on either device."""

import pytest
import torch

from flawscope.data import ImageDataset, open_category
from flawscope.models import get_model_class
from flawscope.synth import SynthSpec, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

SIZE = 32


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_cuda")
    generate(root, SynthSpec(size=SIZE, n_train=32, n_test_good=8, n_test_per_defect=3, seed=2),
             categories=("synthetic_object",))
    return open_category(root / "synthetic_object")


def _fit(name, category, workdir, **settings):
    model = get_model_class(name).from_settings("fast", {"image_size": SIZE, **settings})
    model.fit(ImageDataset(category.train, SIZE), workdir)
    return model


@pytest.mark.parametrize("name,settings", [
    ("ae_ssim", {"epochs": 3, "batches_per_epoch": 4, "batch_size": 8}),
    ("fanogan", {"stage1_epochs": 2, "stage2_epochs": 2, "batches_per_epoch": 4}),
])
def test_a_gpu_fit_scores_on_the_cpu_close_to_a_cpu_fit(name, settings, category, tmp_path):
    gpu = _fit(name, category, tmp_path / "gpu", device="cuda", **settings)
    cpu = _fit(name, category, tmp_path / "cpu", device="cpu", **settings)
    for tensor in gpu.state_tensors().values():
        assert tensor.device.type == "cpu"
    x = torch.stack([ImageDataset([t.path for t in category.test], SIZE)[i] for i in range(8)])
    s_gpu, s_cpu = gpu.score_batch(x)[0], cpu.score_batch(x)[0]
    assert torch.isfinite(s_gpu).all()
    # Same draws and the same steps; only the kernels' rounding differs (cuDNN vs oneDNN), so
    # after a few steps the scores agree closely but not bit for bit.
    assert torch.corrcoef(torch.stack([s_gpu, s_cpu]))[0, 1] > 0.9


def test_a_cpu_checkpoint_resumes_on_the_gpu(category, tmp_path):
    settings = {"batches_per_epoch": 4, "batch_size": 8}
    _fit("ae_l2", category, tmp_path, device="cpu", epochs=2, **settings)
    resumed = _fit("ae_l2", category, tmp_path, device="cuda", epochs=3, **settings)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
