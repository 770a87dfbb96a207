import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.label_space import LabelSpace
from mask2former.data.collate import pad_images
from mask2former.inference.predictor import Predictor, resize_shortest_edge, to_uint8_chw
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config

LABELS = LabelSpace(["a", "b", "c", "sky", "road"], [True, True, True, False, False])


@pytest.fixture(scope="module")
def model(device):
    torch.manual_seed(0)
    return Mask2Former(tiny_swin_config(), labels=LABELS.to_dict()).eval().to(device)


def random_image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_input_types_give_the_same_result(model, device, tmp_path):
    array = random_image(50, 70, 0)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    predictor = Predictor(model, task="semantic", device=device)
    results = [
        predictor(array), predictor(Image.fromarray(array)), predictor(str(path)),
        predictor(torch.from_numpy(array).permute(2, 0, 1)),
        predictor(torch.from_numpy(array).permute(2, 0, 1).float() / 255),
    ]
    assert results[0].shape == (50, 70) and results[0].dtype == torch.int64
    for other in results[1:]:
        assert torch.equal(other, results[0])


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_batched_equals_single(model, device, task):
    images = [random_image(64, 64, 1), random_image(40, 90, 2), random_image(60, 50, 3), random_image(33, 70, 4)]
    predictor = Predictor(model, task=task, batch_size=3, device=device)
    batched = predictor(images)
    for image, result in zip(images, batched):
        single = predictor(image)
        if task == "semantic":
            assert torch.equal(single, result)
            assert result.shape == image.shape[:2]
        elif task == "instance":
            assert result["masks"].shape[1:] == image.shape[:2]
            torch.testing.assert_close(single["scores"], result["scores"], atol=1e-5, rtol=1e-5)
            assert torch.equal(single["labels"], result["labels"])
        else:
            assert torch.equal(single[0], result[0]) and single[1] == result[1]
            assert result[0].shape == image.shape[:2] and result[0].dtype == torch.int32


def test_instance_result_fields(model, device):
    result = Predictor(model, task="instance", top_k=7, device=device)(random_image(64, 48, 5))
    assert set(result) >= {"masks", "labels", "scores", "boxes"}
    # The reference takes the top-k over queries x classes first, then keeps the thing classes.
    count = result["masks"].shape[0]
    assert count <= 7 and result["masks"].shape[1:] == (64, 48) and result["boxes"].shape == (count, 4)
    assert bool((result["labels"] < 3).all())


def test_resize_shortest_edge_respects_max_size():
    image = torch.zeros(3, 100, 400, dtype=torch.uint8)
    assert resize_shortest_edge(image, 200, 600).shape[-2:] == (150, 600)
    assert resize_shortest_edge(image, 200, 1000).shape[-2:] == (200, 800)
    assert resize_shortest_edge(image, None, None).shape[-2:] == (100, 400)


def test_pad_images():
    batch, padding, sizes = pad_images([torch.ones(3, 10, 20, dtype=torch.uint8), torch.ones(3, 40, 5, dtype=torch.uint8)])
    assert batch.shape == (2, 3, 64, 32) and sizes == [(10, 20), (40, 5)]
    assert padding[0, :10, :20].logical_not().all() and padding[0, 10:].all() and padding[0, :, 20:].all()
    assert batch[0][:, 10:].sum() == 0


def test_bad_inputs_are_clear_errors(model, device, tmp_path):
    predictor = Predictor(model, task="semantic", device=device)
    with pytest.raises(ValueError, match="image 0: expected an HxWx3 array"):
        predictor(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_chw(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(Exception, match="missing.png"):
        predictor(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="task must be"):
        Predictor(model, task="depth")


def test_bf16_path_runs(model, device):
    result = Predictor(model, task="semantic", precision="bf16", device=device)(random_image(64, 64, 6))
    assert result.shape == (64, 64)
