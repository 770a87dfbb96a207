import pytest
import torch

from mask2former.data.collate import collate


def make_sample(height, width, num_masks, image_id, fill=7):
    masks = torch.zeros(num_masks, height, width, dtype=torch.bool)
    for index in range(num_masks):
        masks[index, index % height, :] = True
    semantic = torch.full((height, width), 255, dtype=torch.int64)
    semantic[0] = 1
    return {"image": torch.full((3, height, width), fill, dtype=torch.uint8), "labels": torch.arange(num_masks),
            "masks": masks, "iscrowd": torch.zeros(num_masks, dtype=torch.bool), "semantic": semantic,
            "image_id": image_id, "file_name": "", "orig_size": (height, width)}


def test_pads_to_multiple_of_32():
    samples = [make_sample(5, 7, 2, "a"), make_sample(40, 3, 0, "b", fill=9)]
    batch = collate(samples)
    assert batch["images"].dtype == torch.uint8 and tuple(batch["images"].shape) == (2, 3, 64, 32)
    assert batch["image_sizes"] == [(5, 7), (40, 3)]
    assert bool((batch["images"][0, :, :5, :7] == 7).all()) and int(batch["images"][0].sum()) == 7 * 3 * 5 * 7
    assert bool((batch["images"][1, :, :40, :3] == 9).all()) and int(batch["images"][1].sum()) == 9 * 3 * 40 * 3
    expected_padding = torch.ones(64, 32, dtype=torch.bool)
    expected_padding[:5, :7] = False
    assert torch.equal(batch["padding_mask"][0], expected_padding)
    assert int((~batch["padding_mask"][1]).sum()) == 40 * 3

    first = batch["targets"][0]
    assert tuple(first["masks"].shape) == (2, 64, 32) and first["masks"].dtype == torch.bool
    assert torch.equal(first["masks"][:, :5, :7], samples[0]["masks"]) and not first["masks"][:, 5:, :].any()
    assert first["semantic"].dtype == torch.int64 and torch.equal(first["semantic"][:5, :7], samples[0]["semantic"])
    assert bool((first["semantic"][5:, :] == 255).all()) and bool((first["semantic"][:, 7:] == 255).all())
    assert first["labels"].tolist() == [0, 1] and first["iscrowd"].dtype == torch.bool
    second = batch["targets"][1]
    assert tuple(second["masks"].shape) == (0, 64, 32) and second["labels"].shape == (0,)
    assert batch["samples"][0] is samples[0] and batch["samples"][1] is samples[1]


def test_size_divisibility_one_or_zero_pads_to_max():
    samples = [make_sample(5, 7, 1, "a"), make_sample(10, 3, 1, "b")]
    for divisibility in (0, 1):
        assert tuple(collate(samples, size_divisibility=divisibility)["images"].shape) == (2, 3, 10, 7)


def test_exact_multiple_is_not_padded_further():
    batch = collate([make_sample(32, 64, 1, "a")])
    assert tuple(batch["images"].shape) == (1, 3, 32, 64) and not batch["padding_mask"].any()


def test_bad_batches():
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    bad = make_sample(5, 7, 1, "bad")
    bad["masks"] = torch.zeros(1, 5, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="sample 'bad' masks"):
        collate([bad])
    bad = make_sample(5, 7, 1, "float")
    bad["image"] = bad["image"].float()
    with pytest.raises(ValueError, match="sample 'float' image must be uint8"):
        collate([bad])
