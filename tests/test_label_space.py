import pytest
import torch

from mask2former.data.label_space import LabelSpace, default_colors


def make_space(**kwargs):
    arguments = dict(names=["person", "car", "sky", "road"], is_thing=[True, True, False, False],
                     dataset_ids=[1, 3, 17, 40])
    arguments.update(kwargs)
    return LabelSpace(**arguments)


def test_ids_and_thing_stuff_split():
    space = make_space()
    assert space.num_classes == 4
    assert space.thing_ids == [0, 1]
    assert space.stuff_ids == [2, 3]
    assert [space.to_contiguous(value) for value in (1, 3, 17, 40)] == [0, 1, 2, 3]
    assert [space.to_dataset(index) for index in range(4)] == [1, 3, 17, 40]
    assert torch.equal(space.is_thing_tensor(), torch.tensor([True, True, False, False]))
    table = space.lookup_table(41)
    assert table[3] == 1 and table[40] == 3 and table[2] == -1 and table[0] == -1


def test_default_dataset_ids_are_positions():
    space = LabelSpace(names=["a", "b"], is_thing=[False, True])
    assert space.dataset_ids == [0, 1]


def test_unknown_id_error_names_where_and_id():
    space = make_space()
    with pytest.raises(ValueError, match=r"instances\.json annotation 7: unknown category id 2\b"):
        space.to_contiguous(2, where="instances.json annotation 7")
    with pytest.raises(ValueError, match="out of range"):
        space.to_dataset(4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset_ids=[1, 3, 3, 40]), r"duplicate dataset ids \[3\]"),
        (dict(dataset_ids=[1, 255, 17, 40]), "collides with ignore_index 255"),
        (dict(dataset_ids=[1, 3, 17]), "4 names but 3 dataset ids"),
        (dict(is_thing=[True, False]), "4 names but 2 is_thing"),
        (dict(colors=[(0, 0, 0)] * 3), "4 names but 3 colors"),
        (dict(colors=[(0, 0, 256)] * 4), r"colors must be 3 ints in \[0, 255\]"),
        (dict(names=["a", "b", "a", "c"]), r"duplicate class names \['a'\]"),
        (dict(ignore_index=2), "ignore_index 2 collides with contiguous id 2"),
        (dict(dataset_ids=[1, -3, 17, 40]), "must be >= 0"),
        (dict(dataset_ids=[1, 3.0, 17, 40]), "must be an int"),
        (dict(is_thing=[1, 0, 0, 0]), "must be bools"),
    ],
)
def test_construction_rejects_bad_ids(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_space(**kwargs)


def test_empty_label_space_rejected():
    with pytest.raises(ValueError, match="at least one class"):
        LabelSpace(names=[], is_thing=[])


def test_default_colors_stable_distinct_deterministic():
    many = default_colors(1000)
    assert len(set(many)) == 1000
    assert (0, 0, 0) not in many
    assert default_colors(5) == many[:5]  # class i's colour does not depend on the class count
    assert all(0 <= channel <= 255 for color in many for channel in color)
    # consecutive classes are visibly different (golden-ratio hue steps)
    assert all(sum(abs(a - b) for a, b in zip(many[i], many[i + 1])) > 60 for i in range(50))


def test_dict_round_trip_and_equality():
    space = make_space(colors=[(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)], ignore_index=254)
    restored = LabelSpace.from_dict(space.to_dict())
    assert restored == space
    assert restored.colors[1] == (4, 5, 6) and restored.ignore_index == 254
    assert restored != make_space()
    with pytest.raises(ValueError, match="unknown keys"):
        LabelSpace.from_dict({**space.to_dict(), "extra": 1})


def test_yaml_names_form_and_classes_form(tmp_path):
    space = make_space()
    path = tmp_path / "space.yaml"
    space.to_yaml(path)
    assert LabelSpace.from_yaml(path) == space

    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - {name: sky}\n  - {name: car, isthing: true, color: [1, 2, 3]}\n"
                       "ignore_index: 255\n")
    loaded = LabelSpace.from_yaml(classes)
    assert loaded.names == ["sky", "car"] and loaded.is_thing == [False, True] and loaded.dataset_ids == [0, 1]

    short = tmp_path / "short.yaml"
    short.write_text("names: [a, b, c]\n")
    assert LabelSpace.from_yaml(short).is_thing == [False, False, False]


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        LabelSpace.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [a, b]\ndataset_ids: [4, 4]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: .*duplicate dataset ids \[4\]"):
        LabelSpace.from_yaml(bad)


def test_from_coco_categories_sorts_by_id():
    categories = [{"id": 7, "name": "sky", "isthing": 0, "color": [1, 1, 1]},
                  {"id": 2, "name": "cat", "isthing": 1, "color": [2, 2, 2]}]
    space = LabelSpace.from_coco_categories(categories)
    assert space.names == ["cat", "sky"] and space.dataset_ids == [2, 7] and space.is_thing == [True, False]
    assert space.colors == [(2, 2, 2), (1, 1, 1)]
    assert LabelSpace.from_coco_categories(space.to_coco_categories()) == space
    with pytest.raises(ValueError, match=r"x\.json: .*duplicate dataset ids \[2\]"):
        LabelSpace.from_coco_categories(categories + [{"id": 2, "name": "dog"}], where="x.json")
