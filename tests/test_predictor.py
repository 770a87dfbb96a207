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


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_forward_and_postprocess_steps_in_two_threads_equal_a_call(model, device, task):
    """predict over folders post-processes batch k in a worker thread while the next batch runs the model."""
    from concurrent.futures import ThreadPoolExecutor

    images = [random_image(64, 64, 1), random_image(60, 50, 3)]
    predictor = Predictor(model, task=task, device=device, min_size=48, max_size=80)
    expected = predictor(images)
    prepared = [predictor.prepare(image) for image in images]
    assert [size for size, _ in prepared] == [(64, 64), (60, 50)]
    assert [tuple(image.shape[-2:]) for _, image in prepared] == [(48, 48), (58, 48)]  # 60 * 48 / 50 = 57.6
    assert predictor.batch_key(prepared[0][1]) == predictor.batch_key(prepared[1][1]) == (64, 64)
    forwarded = predictor.forward_batch([image for _, image in prepared], [size for size, _ in prepared])
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(predictor.postprocess_batch, forwarded, (task,)).result()
    for result, single, (size, _) in zip(results, expected, prepared):
        if task == "semantic":
            assert tuple(single.shape) == size
            assert torch.equal(result[task], single)
        elif task == "panoptic":
            assert torch.equal(result[task][0], single[0]) and result[task][1] == single[1]
        else:
            assert all(torch.equal(result[task][key], single[key]) for key in single)


def test_panoptic_resizes_only_kept_queries_with_the_same_result(model, device):
    """Oracle: panoptic inference on every query's logits resized to the image (the reference's order)."""
    from mask2former.inference.postprocess import panoptic_inference, resize_mask_logits

    image = random_image(50, 70, 7)
    for threshold in (0.0, 0.2, 0.8):
        predictor = Predictor(model, task="panoptic", device=device, object_mask_threshold=threshold)
        segment_map, segments = predictor(image)
        forwarded = predictor.forward_batch([to_uint8_chw(image)], [(50, 70)])
        outputs = forwarded.outputs
        resized = resize_mask_logits(outputs.pred_masks[0], forwarded.padded_size, (50, 70), (50, 70))
        expected_map, expected_segments = panoptic_inference(
            outputs.pred_logits[0], resized, predictor.is_thing, threshold, 0.8)
        assert torch.equal(segment_map, expected_map.cpu()) and segments == expected_segments


def test_label_space_is_the_models_or_class_names(model, device):
    assert Predictor(model, device=device).label_space.names == LABELS.names
    bare = Mask2Former(tiny_swin_config()).eval()
    space = Predictor(bare, device=device).label_space
    assert space.names == [f"class_{i}" for i in range(bare.num_classes)] and all(space.is_thing)
    with pytest.raises(ValueError, match="label space has 2 classes"):
        Predictor(model, device=device, label_space=LabelSpace(["a", "b"], [True, True]))
