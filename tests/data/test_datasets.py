import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tag_lightning.answers.labels import EMOTIONS, FERPLUS_VOTE_COLUMNS
from tag_lightning.au.cache import AUCache
from tag_lightning.commands.cli import image_refs, main
from tag_lightning.data.datasets import (
    AffectNet,
    DatasetFormatError,
    FERPlus,
    FERSample,
    ImageFile,
    ImageFolder,
    ManifestCSV,
    RafDB,
    ferplus_vote,
    parse_data_spec,
)
from tag_lightning.errors import UserError
from tag_lightning.images import load_image


def votes(**counts: int) -> tuple[int, ...]:
    return tuple(counts.get(column, 0) for column in FERPLUS_VOTE_COLUMNS)


def error_at(path: Path, line: int) -> str:
    """A regex for an error message naming a file and line."""
    return re.escape(f"{path}:{line}:")


# RAF-DB ------------------------------------------------------------------------------------------


def test_rafdb_reads_each_split_with_unified_labels(tmp_path, make_rafdb):
    root = make_rafdb(tmp_path)
    train, test = RafDB(root, "train"), RafDB(root, "test")
    assert [sample.label for sample in train] == ["sadness", "happiness"]
    assert [sample.label for sample in test] == ["neutral"]
    first = train[0]
    assert isinstance(first, FERSample)
    assert (first.dataset, first.split) == ("rafdb", "train")
    assert first.image.path == str(root / "Image" / "aligned" / "train_00001_aligned.jpg")
    assert first.source == f"{root / 'EmoLabel' / 'list_patition_label.txt'}:1"
    assert load_image(first.image).shape == (100, 100, 3)


def test_rafdb_original_images_and_class_subset(tmp_path, make_rafdb):
    dataset = RafDB(make_rafdb(tmp_path), "train", aligned=False)
    assert dataset[1].image.path.endswith("original/train_00002.jpg")
    assert load_image(dataset[1].image).shape == (90, 120, 3)
    assert len(dataset.classes) == 7 and "contempt" not in dataset.classes


@pytest.mark.parametrize(
    ("rows", "without_image", "problem"),
    [
        ((("train_00001.jpg", 5), ("train_00002.jpg", 8)), (), "RAF-DB label '8'"),
        ((("train_00001.jpg", 5), ("train_00002.jpg", "sad")), (), "RAF-DB label 'sad'"),
        ((("train_00001.jpg", 5), ("train_00002.jpg", "4 extra")), (), "expected '<image name> <label 1-7>'"),
        ((("train_00001.jpg", 5), ("train_00002.jpg", 4)), ("train_00002.jpg",), "image file not found"),
    ],
)
def test_rafdb_malformed_rows_name_file_and_line(tmp_path, make_rafdb, rows, without_image, problem):
    root = make_rafdb(tmp_path, rows, without_image=without_image)
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    with pytest.raises(DatasetFormatError, match=error_at(label_file, 2) + ".*" + re.escape(problem)):
        RafDB(root, "train")
    lenient = RafDB(root, "train", lenient=True)
    assert len(lenient) == 1 and lenient[0].label == "sadness"
    assert len(lenient.skipped) == 1 and lenient.skipped[0].startswith(f"{label_file}:2:")


def test_rafdb_rows_of_the_other_split_are_not_validated(tmp_path, make_rafdb):
    root = make_rafdb(tmp_path, (("train_00001.jpg", 5), ("test_0001.jpg", 7)), without_image=("test_0001.jpg",))
    assert len(RafDB(root, "train")) == 1


def test_rafdb_unknown_split_and_missing_label_file(tmp_path, make_rafdb):
    with pytest.raises(ValueError, match="no split 'val'.*train, test"):
        RafDB(make_rafdb(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
        RafDB(tmp_path / "nowhere")


# FERPlus -----------------------------------------------------------------------------------------


def test_ferplus_splits_labels_and_image_names(tmp_path, make_ferplus):
    root = make_ferplus(
        tmp_path,
        [
            {"votes": votes(happiness=6, neutral=4)},
            {"usage": "PublicTest", "votes": votes(surprise=7, fear=3)},
            {"usage": "PrivateTest", "votes": votes(contempt=5, anger=3, unknown=2)},
            {"votes": votes(neutral=9, NF=1)},
        ],
    )
    train = FERPlus(root, "train")
    assert [sample.label for sample in train] == ["happiness", "neutral"]
    assert [sample.image.name for sample in train] == ["ferplus:FER2013Train:0", "ferplus:FER2013Train:3"]
    assert train[1].source == f"{root / 'fer2013.csv'}:5"
    assert [s.label for s in FERPlus(root, "val")] == ["surprise"]
    test = FERPlus(root, "test")
    assert [s.label for s in test] == ["contempt"] and test[0].split == "test"
    assert test[0].image.name == "ferplus:FER2013Test:2"
    assert train.classes == EMOTIONS


def test_ferplus_image_is_the_48x48_grayscale_of_the_pixel_string(tmp_path, make_ferplus):
    pixels = np.arange(48 * 48) % 256
    root = make_ferplus(tmp_path, [{"pixels": " ".join(map(str, pixels))}])
    sample = FERPlus(root)[0]
    assert sample.image.path is None and sample.image.data.startswith(b"\x89PNG")
    rgb = load_image(sample.image)
    assert rgb.shape == (48, 48, 3)
    np.testing.assert_array_equal(rgb[:, :, 0], pixels.reshape(48, 48))
    np.testing.assert_array_equal(rgb[:, :, 0], rgb[:, :, 2])


def test_ferplus_drops_ties_unknown_non_faces_and_removed_images_in_both_modes(tmp_path, make_ferplus):
    root = make_ferplus(
        tmp_path,
        [
            {"votes": votes(happiness=10)},
            {"votes": votes(happiness=4, sadness=4, neutral=2)},
            {"votes": votes(unknown=5, fear=3, neutral=2)},
            {"votes": votes(anger=4, unknown=4, disgust=2)},
            {"votes": votes(NF=10)},
            {"name": "", "votes": votes(NF=10)},
        ],
    )
    for lenient in (False, True):
        dataset = FERPlus(root, lenient=lenient)
        assert [sample.label for sample in dataset] == ["happiness"]
        assert dataset.dropped == {"tie": 1, "unknown": 2, "not a face": 1, "no image name": 1}
        assert dataset.skipped == []


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"pixels": "1 2 3"}, "expected 2304 pixel values, got 3"),
        ({"pixels": "12 " * 2303 + "x"}, "space-separated integers"),
        ({"pixels": "12 " * 2303 + "256"}, "0..255"),
    ],
)
def test_ferplus_bad_pixels_name_file_and_line(tmp_path, make_ferplus, row, problem):
    root = make_ferplus(tmp_path, [{}, row, {}])
    with pytest.raises(DatasetFormatError, match=error_at(root / "fer2013.csv", 3) + ".*" + re.escape(problem)):
        FERPlus(root)
    lenient = FERPlus(root, lenient=True)
    assert [sample.image.name for sample in lenient] == ["ferplus:FER2013Train:0", "ferplus:FER2013Train:2"]
    assert len(lenient.skipped) == 1 and problem in lenient.skipped[0]


def test_ferplus_bad_votes_and_usage_name_the_vote_file(tmp_path, make_ferplus):
    root = make_ferplus(tmp_path, [{"votes": ("x",) * 10}])
    with pytest.raises(DatasetFormatError, match=error_at(root / "fer2013new.csv", 2) + ".*integers"):
        FERPlus(root)
    (root / "fer2013new.csv").write_text((root / "fer2013new.csv").read_text().replace("Training,", "PublicTest,"))
    with pytest.raises(DatasetFormatError, match=error_at(root / "fer2013new.csv", 2) + ".*Usage 'PublicTest'"):
        FERPlus(root)


def test_ferplus_files_of_different_length_are_rejected_even_when_lenient(tmp_path, make_ferplus):
    root = make_ferplus(tmp_path, [{}, {}])
    votes_file = root / "fer2013new.csv"
    votes_file.write_text("".join(votes_file.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(DatasetFormatError, match="same rows"):
        FERPlus(root, lenient=True)


def test_ferplus_builds_png_bytes_only_when_a_sample_is_read(tmp_path, make_ferplus, monkeypatch):
    root = make_ferplus(tmp_path, [{}, {}])

    def no_encoding(self, pixels):
        raise AssertionError("encoded at construction")

    monkeypatch.setattr(FERPlus, "_png", no_encoding)
    dataset = FERPlus(root)
    assert len(dataset) == 2
    with pytest.raises(AssertionError):
        dataset[0]


def test_ferplus_strict_policy_needs_more_than_half_of_the_non_single_votes(tmp_path, make_ferplus):
    root = make_ferplus(
        tmp_path,
        [
            {"votes": votes(happiness=4, surprise=3, sadness=3)},
            {"votes": votes(happiness=5, neutral=1, surprise=1, sadness=1, anger=1, fear=1)},
        ],
    )
    assert [s.label for s in FERPlus(root, vote_policy="majority")] == ["happiness", "happiness"]
    strict = FERPlus(root, vote_policy="strict")
    assert [s.label for s in strict] == ["happiness"] and strict.dropped == {"no majority": 1}
    with pytest.raises(ValueError, match="vote_policy"):
        FERPlus(root, vote_policy="mean")


@given(st.lists(st.integers(0, 10), min_size=10, max_size=10), st.sampled_from(["majority", "strict"]))
def test_a_ferplus_vote_label_is_an_emotion_with_strictly_the_most_votes(counts, policy):
    row = dict(zip(FERPLUS_VOTE_COLUMNS, counts))
    label, reason = ferplus_vote(row, policy)
    assert (label is None) != (reason is None)
    if label is not None:
        assert label in EMOTIONS
        assert all(count < row[label] for column, count in row.items() if column != label)


# AffectNet ---------------------------------------------------------------------------------------


AFFECTNET_ROWS = [(f"{code}01/img{code}.jpg", code) for code in range(11)]


def test_affectnet_csv_maps_codes_and_excludes_non_expressions(tmp_path, make_affectnet):
    root = make_affectnet(tmp_path, AFFECTNET_ROWS)
    dataset = AffectNet(root, "train", layout="csv")
    assert [sample.label for sample in dataset] == list(EMOTIONS)
    assert dataset.dropped == {"none": 1, "uncertain": 1, "no-face": 1}
    assert dataset[1].image.path == str(root / "Manually_Annotated_Images" / "101" / "img1.jpg")
    assert dataset[1].source == f"{root / 'training.csv'}:3"
    assert load_image(dataset[1].image).shape == (64, 64, 3)


def test_affectnet_val_split_reads_validation_csv_with_or_without_header(tmp_path, make_affectnet):
    for header in (True, False):
        root = make_affectnet(tmp_path / str(header), AFFECTNET_ROWS[:3], split="val", header=header)
        dataset = AffectNet(root, "val")
        assert dataset.layout == "csv" and dataset.split == "val"
        assert [sample.label for sample in dataset] == ["neutral", "happiness", "sadness"]
    with pytest.raises(ValueError, match="no split 'test'"):
        AffectNet(root, "test")


@pytest.mark.parametrize(
    ("rows", "without_image", "problem"),
    [
        ([("1/a.jpg", 1), ("1/b.jpg", 12)], (), "AffectNet expression '12'"),
        ([("1/a.jpg", 1), ("1/b.jpg", "")], (), "AffectNet expression ''"),
        ([("1/a.jpg", 1), ("1/b.jpg", 2)], ("1/b.jpg",), "image file not found"),
    ],
)
def test_affectnet_malformed_rows_name_file_and_line(tmp_path, make_affectnet, rows, without_image, problem):
    root = make_affectnet(tmp_path, rows, without_image=without_image)
    with pytest.raises(DatasetFormatError, match=error_at(root / "training.csv", 3) + ".*" + re.escape(problem)):
        AffectNet(root)
    lenient = AffectNet(root, lenient=True)
    assert [sample.label for sample in lenient] == ["happiness"] and len(lenient.skipped) == 1


def test_affectnet_missing_column_is_a_format_error(tmp_path):
    (tmp_path / "training.csv").write_text("subDirectory_filePath,expression\n1/a.jpg,1\n")
    with pytest.raises(DatasetFormatError, match="missing column.*face_x"):
        AffectNet(tmp_path, layout="csv", lenient=True)


def test_affectnet_folder_layout(tmp_path, make_affectnet):
    root = make_affectnet(tmp_path, [("a.jpg", 0), ("b.jpg", 7), ("c.jpg", 7), ("d.jpg", 9)], layout="folders")
    for layout in ("auto", "folders"):
        dataset = AffectNet(root, "train", layout=layout)
        assert dataset.layout == "folders"
        assert [sample.label for sample in dataset] == ["neutral", "contempt", "contempt"]
        assert dataset.dropped == {"uncertain": 1}
    (root / "train" / "smile").mkdir()
    with pytest.raises(DatasetFormatError, match=re.escape(str(root / "train" / "smile"))):
        AffectNet(root)
    with pytest.raises(FileNotFoundError, match="validation.csv"):
        AffectNet(root, "val")


# Manifest and folder -----------------------------------------------------------------------------


def test_manifest_resolves_paths_normalizes_labels_and_filters_splits(tmp_path, make_face):
    make_face(tmp_path / "imgs" / "a.jpg")
    make_face(tmp_path / "imgs" / "b.png")
    elsewhere = make_face(tmp_path / "other" / "c.jpg")
    manifest = tmp_path / "lists" / "faces.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,label,split\n../imgs/a.jpg,Happy,train\n../imgs/b.png,,test\n{elsewhere},angry,\n")
    everything = ManifestCSV(manifest)
    assert [sample.label for sample in everything] == ["happiness", None, "anger"]
    assert [sample.split for sample in everything] == ["train", "test", "all"]
    assert Path(everything[0].image.path).resolve() == (tmp_path / "imgs" / "a.jpg").resolve()
    assert everything.classes is None  # declared by the run (`data.labels`), never read off the rows
    assert [sample.label for sample in ManifestCSV(manifest, "train")] == ["happiness", "anger"]
    assert [sample.image.name.endswith("b.png") for sample in ManifestCSV(manifest, "test")] == [True, False]


def test_manifest_errors(tmp_path, make_face):
    make_face(tmp_path / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,sad\na.jpg,grumpy\nmissing.jpg,sad\n")
    with pytest.raises(DatasetFormatError, match=error_at(manifest, 3) + ".*'grumpy'"):
        ManifestCSV(manifest)
    lenient = ManifestCSV(manifest, lenient=True)
    assert len(lenient) == 1
    assert [message.split(": ", 1)[0] for message in lenient.skipped] == [f"{manifest}:3", f"{manifest}:4"]
    manifest.write_text("file,label\na.jpg,sad\n")
    with pytest.raises(DatasetFormatError, match="missing column.*path"):
        ManifestCSV(manifest)


def test_image_folder_labels_from_folder_names_and_unlabeled_root_images(tmp_path, make_face):
    make_face(tmp_path / "Happy" / "1.jpg")
    make_face(tmp_path / "sadness" / "2.png")
    make_face(tmp_path / "loose.jpg")
    (tmp_path / "Happy" / "notes.txt").write_text("not an image")
    dataset = ImageFolder(tmp_path)
    assert sorted((Path(s.image.path).name, s.label) for s in dataset) == [
        ("1.jpg", "happiness"), ("2.png", "sadness"), ("loose.jpg", None),
    ]
    assert dataset.classes is None
    make_face(tmp_path / "grumpy" / "3.jpg")
    with pytest.raises(DatasetFormatError, match=re.escape(str(tmp_path / "grumpy"))):
        ImageFolder(tmp_path)
    lenient = ImageFolder(tmp_path, lenient=True)
    assert len(lenient) == 3 and len(lenient.skipped) == 1


# Specs -------------------------------------------------------------------------------------------


def test_parse_data_spec_builds_each_adapter(tmp_path, make_rafdb, make_ferplus, make_affectnet, make_face):
    rafdb = make_rafdb(tmp_path / "raf")
    ferplus = make_ferplus(tmp_path / "ferplus", [{}, {"usage": "PrivateTest"}])
    affectnet = make_affectnet(tmp_path / "affectnet", AFFECTNET_ROWS[:2], split="val")
    make_face(tmp_path / "folder" / "happy" / "x.jpg")
    (tmp_path / "m.csv").write_text("path,label\nfolder/happy/x.jpg,happy\n")
    assert isinstance(parse_data_spec(f"rafdb:{rafdb}"), RafDB)
    assert parse_data_spec(f"rafdb:{rafdb}", "test").split == "test"
    assert parse_data_spec(f"FERPlus:{ferplus}", split="test")[0].image.name == "ferplus:FER2013Test:1"
    assert len(parse_data_spec(f"affectnet:{affectnet}", split="val")) == 2
    seven = parse_data_spec(f"affectnet7:{affectnet}", split="val")
    assert seven.classes == tuple(label for label in EMOTIONS if label != "contempt")
    assert isinstance(parse_data_spec(f"manifest:{tmp_path / 'm.csv'}"), ManifestCSV)
    assert parse_data_spec(f"folder:{tmp_path / 'folder'}")[0].label == "happiness"



def test_an_image_file_is_a_one_image_dataset_with_no_fixed_label_set(tmp_path, make_face):
    make_face(tmp_path / "photo.JPG")
    for spec in (str(tmp_path / "photo.JPG"), f"image:{tmp_path / 'photo.JPG'}"):
        dataset = parse_data_spec(spec)
        assert isinstance(dataset, ImageFile) and [(s.image.path, s.label) for s in dataset] == [
            (str(tmp_path / "photo.JPG"), None)]
        assert dataset.classes is None  # the run's `data.labels`, else every emotion (`FERDataModule.offered`)
    assert ImageFolder(tmp_path).classes is None
    with pytest.raises(DatasetFormatError, match="image file not found"):
        parse_data_spec(f"image:{tmp_path / 'gone.jpg'}")


@pytest.mark.parametrize("spec", ["raf:/data", "rafdb:", ""])
def test_parse_data_spec_rejects_unknown_forms_listing_the_accepted_ones(spec):
    with pytest.raises(ValueError, match=re.escape("rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, affectnet7:ROOT, "
                                                   "manifest:FILE.csv")):
        parse_data_spec(spec)


def test_a_bare_path_that_is_not_there_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no such folder: {re.escape(str(tmp_path / 'rafdb'))}"):
        parse_data_spec(str(tmp_path / "rafdb"))
    with pytest.raises(FileNotFoundError, match="no such file: .*labels.csv"):
        parse_data_spec(str(tmp_path / "labels.csv"))


def test_missing_images_can_be_kept_and_unknown_manifest_columns_are_told(tmp_path, make_face):
    make_face(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("path,label,age,notes\na.jpg,happy,30,x\ngone.jpg,sad,40,y\n")
    with pytest.raises(DatasetFormatError, match="m.csv:3: image file not found"):
        parse_data_spec(str(tmp_path / "m.csv"))
    kept = parse_data_spec(str(tmp_path / "m.csv"), keep_missing=True)
    assert [Path(sample.image.name).name for sample in kept] == ["a.jpg", "gone.jpg"]
    assert kept.notes == [f"{tmp_path / 'm.csv'}:1: column(s) age, notes ignored (read: path, label, split)"]


def test_au_cache_builds_from_ferplus_pixel_strings(make_ferplus, samples_dir, tmp_path, capsys):
    """`tag prepare au-cache --images ferplus:ROOT`: the images live inside the CSV, not in files;
    without --split, every split is cached (a data config validates and tests on val and test)."""
    from PIL import Image as PILImage

    from tag_lightning.data.samples import HAPPINESS

    face = np.asarray(PILImage.open(samples_dir / HAPPINESS).convert("L"))[140:480, 100:400]
    face48 = np.asarray(PILImage.fromarray(face).resize((48, 48), PILImage.Resampling.BOX))
    rows = [{"pixels": " ".join(map(str, face48.flatten()))}, {}, {"usage": "PrivateTest"}]
    root = make_ferplus(tmp_path / "ferplus", rows)
    assert main(["prepare", "au-cache", "--images", f"ferplus:{root}", "--out", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"ferplus:{root}: train 2, val 0, test 1\n")
    cache = AUCache(tmp_path / "cache")
    face_record = cache.get_by_name("ferplus:FER2013Train:0")
    assert face_record.status in ("ok", "low_quality") and face_record.landmarks.shape == (478, 2)
    assert face_record.size == (48, 48)
    assert cache.get_by_name("ferplus:FER2013Train:1").status == "no_face"  # random pixels
    assert cache.get_by_name("ferplus:FER2013Test:2").status == "no_face"


def test_au_cache_images_are_every_split_unless_one_is_named(tmp_path, make_rafdb, make_affectnet, capsys):
    """`tag prepare au-cache --images rafdb:ROOT` caches the test split too: the RAF-DB data config
    validates on it. A split missing on disk is a note."""
    rafdb = make_rafdb(tmp_path / "raf")  # train_00001, train_00002, test_0001
    assert [Path(ref.name).name for ref in image_refs(f"rafdb:{rafdb}")] == [
        "train_00001_aligned.jpg", "train_00002_aligned.jpg", "test_0001_aligned.jpg"]
    assert capsys.readouterr().out == f"rafdb:{rafdb}: train 2, test 1\n"
    assert [Path(ref.name).name for ref in image_refs(f"rafdb:{rafdb}", "test")] == ["test_0001_aligned.jpg"]
    assert capsys.readouterr().out == f"rafdb:{rafdb}: test 1\n"
    affectnet = make_affectnet(tmp_path / "affectnet", AFFECTNET_ROWS[:2], split="val")  # no training data
    assert [Path(ref.name).name for ref in image_refs(f"affectnet:{affectnet}")] == ["img0.jpg", "img1.jpg"]
    out, err = capsys.readouterr()
    assert out == f"affectnet:{affectnet}: val 2\n"
    assert err == (f"note: affectnet:{affectnet} has no train split (AffectNet: neither {affectnet / 'training.csv'} "
                   f"nor the folder {affectnet / 'train'} exists)\n")


def test_au_cache_over_a_data_config_caches_what_each_role_reads(tmp_path, make_rafdb, capsys):
    """`tag prepare au-cache --images configs/data/rafdb.yaml`: train data in its split, val and test
    data in theirs (the test split once), so `tag fit` with that config finds every image cached."""
    rafdb = make_rafdb(tmp_path / "raf")  # train_00001, train_00002, test_0001
    config = tmp_path / "rafdb.yaml"
    config.write_text(f"data:\n  train_data: rafdb:{rafdb}\n  val_data: rafdb:{rafdb}\n  test_data: rafdb:{rafdb}\n"
                      "  train_split: train\n  val_split: test\n  test_split: test\n")
    assert [Path(ref.name).name for ref in image_refs(str(config))] == [
        "train_00001_aligned.jpg", "train_00002_aligned.jpg", "test_0001_aligned.jpg"]
    assert capsys.readouterr().out == f"{config}: train 2, test 1\n"
    assert [Path(ref.name).name for ref in image_refs(str(config), "val")] == ["test_0001_aligned.jpg"]
    config.write_text("data:\n  batch_size: 8\n")
    with pytest.raises(ValueError, match="names no train_data, val_data or test_data"):
        image_refs(str(config))

def test_an_empty_split_is_an_error_naming_the_splits_that_have_images(tmp_path, make_ferplus, capsys):
    """A FERPlus file of PrivateTest rows only: its train split, asked for or read by default
    (`tag prepare traces`), has no image, and the error says where they are."""
    spec = f"ferplus:{make_ferplus(tmp_path / 'ferplus', [{'usage': 'PrivateTest'}] * 2)}"
    usage = "FERPlus rows' Usage is Training/PublicTest/PrivateTest for train/val/test"
    assert [ref.name for ref in image_refs(spec)] == ["ferplus:FER2013Test:0", "ferplus:FER2013Test:1"]
    expected = f"no images in the train split of {spec} ({usage}; it has: test 2); pass --split test"
    with pytest.raises(UserError) as error:
        image_refs(spec, "train")
    assert str(error.value) == expected
    AUCache(tmp_path / "cache", create=True)
    out = tmp_path / "traces.jsonl"
    assert main(["prepare", "traces", "--data", spec, "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n" and not out.exists()
    tied = f"ferplus:{make_ferplus(tmp_path / 'tied', [{'votes': votes(happiness=5, sadness=5)}])}"
    with pytest.raises(UserError) as error:
        image_refs(tied)
    assert str(error.value) == f"no images in any split (train, val, test) of {tied} ({usage})"


def test_a_yaml_data_config_is_a_data_spec(make_rafdb, tmp_path):
    first, second = make_rafdb(tmp_path / "a"), make_rafdb(tmp_path / "b")
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  train_data: [rafdb:{first}, rafdb:{second}]\n  test_data: rafdb:{first}\n"
                      "  test_split: test\n")
    combined = parse_data_spec(str(config))
    separate = [RafDB(first), RafDB(second)]
    assert len(combined) == sum(len(d) for d in separate)
    assert [s.image.name for s in combined] == [s.image.name for d in separate for s in d]
    assert combined.classes == separate[0].classes
    test = parse_data_spec(str(config), split="test")
    assert [s.image.name for s in test] == [s.image.name for s in RafDB(first, split="test")]
    with pytest.raises(ValueError, match="val_data"):
        parse_data_spec(str(config), split="val")
