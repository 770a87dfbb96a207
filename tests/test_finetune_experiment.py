"""experiments/finetune.py: the coarse relabelling of FashionScenes (hand-made sample) and the summary table."""

from __future__ import annotations

import pytest
import torch

from conftest import load_experiment


@pytest.fixture(scope="module")
def finetune():
    return load_experiment("finetune", "finetune_experiment")


def test_remap_merges_classes_and_stuff_regions(finetune):
    from mask2former.data.fashion_scenes import fashion_scenes_label_space

    source = fashion_scenes_label_space().names
    mapping = finetune.class_mapping(source)
    space = finetune.coarse_label_space()
    top, paving = space.names.index("top"), space.names.index("paving")
    masks = torch.zeros(4, 2, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, :2] = masks[3, :, 2] = True  # Coat, Shirt, gravel, brick
    ids = [source.index(n) for n in ("Coat", "Shirt", "gravel", "brick")]
    semantic = torch.tensor([[ids[0], ids[1], ids[3]], [ids[2], ids[2], 255]])
    sample = {"labels": torch.tensor(ids), "masks": masks, "iscrowd": torch.tensor([False, True, False, False]),
              "semantic": semantic, "image_id": 7}
    out = finetune.remap(sample, mapping, space.is_thing)
    assert out["labels"].tolist() == [top, top, paving]  # two top instances, one paving segment
    assert out["iscrowd"].tolist() == [False, True, False]
    assert torch.equal(out["masks"][2], masks[2] | masks[3])
    assert out["semantic"].tolist() == [[top, top, paving], [paving, paving, 255]]
    shared = set(space.names) & set(source)
    assert shared == {"Trouser", "Dress", "Bag", "grass"}


def test_table_pairs_seeds(finetune):
    def run(arm, seed, pq):
        return {"arm": arm, "seed": seed, "curve": [{"step": 100, "PQ": pq, "AP": 1.0, "mIoU": 2.0}]}

    arms = {"finetune": [run("finetune", 0, 50.0), run("finetune", 1, 54.0)],
            "imagenet": [run("imagenet", 0, 20.0), run("imagenet", 1, 30.0)]}
    lines = finetune.table(arms)
    assert lines[2].startswith("| 100 | 52.0 ± 2.8 |") and "+27.0 (seeds: +30.0, +24.0)" in lines[2]
