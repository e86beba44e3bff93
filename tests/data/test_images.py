"""Digits, ImageFolder (digits saved as PNGs) and image-text CSVs: shapes, normalisation, splits, labels."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from lit_lowrank.data import DigitsDataModule, ImageFolderDataModule, ImageTextDataModule
from lit_lowrank.data.images import CLIP_MEAN, CLIP_STD, DIGIT_NAMES, IMAGENET_MEAN, IMAGENET_STD

DIGITS = load_digits()


def test_digits_batches_are_normalised_three_channel_images():
    dm = DigitsDataModule(batch_size=32)
    assert dm.num_classes == 10 and dm.class_names == DIGIT_NAMES  # before setup
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"images", "labels"}
    assert batch["images"].shape == (32, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    # at the native size nothing is resampled: the values are exactly (pixel / 16 - mean) / std
    native = DigitsDataModule(image_size=8, batch_size=5)
    native.setup("test")
    images = next(iter(native.test_dataloader()))["images"]
    raw = torch.tensor(DIGITS.images[native.indices["test"][:5]], dtype=torch.float32) / 16
    for c in range(3):
        assert torch.allclose(images[:, c], (raw - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    # upsampling keeps the value range and the background
    assert batch["images"][:, 0].min() == pytest.approx(-IMAGENET_MEAN[0] / IMAGENET_STD[0], abs=1e-5)
    assert batch["images"][:, 0].max() <= (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0] + 1e-5


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=7)
    a.setup(), b.setup()
    assert all(torch.equal(a.indices[s], b.indices[s]) for s in a.indices)  # independent of the seed
    train, val, test = (set(a.indices[s].tolist()) for s in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test and len(train | val | test) == 1797
    counts = np.bincount(DIGITS.target, minlength=10)
    for split, share in (("validation", 0.15), ("test", 0.15)):
        per_class = np.bincount(DIGITS.target[a.indices[split].numpy()], minlength=10)
        assert np.all(np.abs(per_class - share * counts) <= 0.5 + 1e-9)
    labels = torch.cat([batch["labels"] for batch in a.val_dataloader()])
    assert torch.equal(labels, torch.tensor(DIGITS.target[a.indices["validation"].numpy()]))


def test_digits_few_shot_counts_and_seeds():
    runs = {}
    for seed in (0, 0, 1):
        dm = DigitsDataModule(train_per_class=4, seed=seed, batch_size=100)
        dm.setup("fit")
        runs.setdefault(seed, []).append(dm.indices["train"])
        labels = next(iter(dm.train_dataloader()))["labels"]
        assert labels.bincount(minlength=10).tolist() == [4] * 10
    full = DigitsDataModule()
    full.setup()
    assert set(runs[0][0].tolist()) <= set(full.indices["train"].tolist())
    assert torch.equal(runs[0][0], runs[0][1]) and not torch.equal(runs[0][0], runs[1][0])
    with pytest.raises(ValueError, match="train_per_class=500 but class 0 has only"):
        DigitsDataModule(train_per_class=500).setup()


def _digit_pngs(root, indices):
    for i in indices:
        folder = root / DIGIT_NAMES[DIGITS.target[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((DIGITS.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")


def test_image_folder_from_digit_pngs(tmp_path):
    _digit_pngs(tmp_path / "train", range(0, 120))
    _digit_pngs(tmp_path / "val", [i for i in range(120, 160) if DIGITS.target[i] != 3])  # one class absent
    dm = ImageFolderDataModule(str(tmp_path / "train"), val_dir=str(tmp_path / "val"), image_size=16, batch_size=200)
    assert dm.class_names == sorted(DIGIT_NAMES) and dm.num_classes == 10  # folder names, sorted
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (120, 3, 16, 16) and batch["images"].dtype == torch.float32
    val = next(iter(dm.val_dataloader()))
    names = sorted(DIGIT_NAMES)
    expected = sorted(names.index(DIGIT_NAMES[DIGITS.target[i]]) for i in range(120, 160) if DIGITS.target[i] != 3)
    assert sorted(val["labels"].tolist()) == expected  # same ids as training although "three" is missing
    # pixels were normalised with the given statistics: black background -> -mean/std
    assert val["images"][:, 1].min() == pytest.approx(-IMAGENET_MEAN[1] / IMAGENET_STD[1], abs=1e-4)


def test_image_folder_held_out_share_and_errors(tmp_path):
    _digit_pngs(tmp_path / "train", range(0, 100))
    dm = ImageFolderDataModule(str(tmp_path / "train"), val_fraction=0.2, image_size=8)
    dm.setup()
    train = {p for p, _ in dm.datasets["train"].samples}
    val = {p for p, _ in dm.datasets["validation"].samples}
    assert len(train | val) == 100 and not train & val and 5 < len(val) < 40
    (tmp_path / "test" / "eleven").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folders \['eleven'\] that train_dir does not have"):
        ImageFolderDataModule(str(tmp_path / "train"), test_dir=str(tmp_path / "test")).setup()
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _ = ImageFolderDataModule(str(tmp_path / "nowhere")).class_names
    with pytest.raises(RuntimeError, match="no test split"):
        dm.test_dataloader()


def _pairs(tmp_path, rows, name="pairs.csv", header="image,caption,label"):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(len(rows)):
        Image.fromarray((DIGITS.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(
            tmp_path / "imgs" / f"{i}.png")
    path = tmp_path / "lists" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(header + "\n" + "".join(f"../imgs/{i}.png,{','.join(row)}\n" for i, row in enumerate(rows)))
    return str(path)


def test_image_text_pairs_with_labels(tmp_path):
    import open_clip

    rows = [(f"a handwritten {DIGIT_NAMES[DIGITS.target[i]]}", DIGIT_NAMES[DIGITS.target[i]]) for i in range(12)]
    train = _pairs(tmp_path, rows)
    dm = ImageTextDataModule(train, val_file=train, context_length=16, image_size=24, batch_size=12)
    assert dm.class_names == sorted({y for _, y in rows}) and dm.num_classes == len({y for _, y in rows})
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"images", "texts", "labels"}
    assert batch["images"].shape == (12, 3, 24, 24) and batch["texts"].shape == (12, 16)
    assert batch["texts"].dtype == torch.long and batch["labels"].dtype == torch.long
    expected = open_clip.tokenizer.SimpleTokenizer(context_length=16)([c for c, _ in rows])
    assert torch.equal(batch["texts"], expected)
    assert batch["labels"].tolist() == [dm.class_names.index(y) for _, y in rows]
    assert batch["images"][:, 2].min() == pytest.approx(-CLIP_MEAN[2] / CLIP_STD[2], abs=1e-4)


def test_image_text_without_labels_and_by_model_name(tmp_path):
    path = _pairs(tmp_path, [("a photo",), ("another photo",)], header="image,caption")
    dm = ImageTextDataModule(path, val_file=path, tokenizer="ViT-B-32", image_size=8)
    assert dm.class_names == [] and not dm.has_labels
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"images", "texts"} and batch["texts"].shape == (2, 77)


def test_image_text_errors(tmp_path):
    path = _pairs(tmp_path, [("a photo", "x")])
    with pytest.raises(ValueError, match="needs val_file"):
        ImageTextDataModule(path).setup("fit")
    with pytest.raises(KeyError, match="column 'filepath' not found.*image_field="):
        ImageTextDataModule(path, val_file=path, image_field="filepath").setup()
    (tmp_path / "lists" / "broken.csv").write_text("image,caption\n../imgs/missing.png,gone\n")
    with pytest.raises(FileNotFoundError, match="1 image.*missing.png.*relative to the folder"):
        ImageTextDataModule(str(tmp_path / "lists" / "broken.csv")).setup("test")
    with pytest.raises(ValueError, match="'ViT-B-33' is not an open_clip model name.*list_models"):
        _ = ImageTextDataModule(path, tokenizer="ViT-B-33").tokenizer
    with pytest.raises(OSError, match="open_clip tokenizer of 'hf-hub:nobody/nothing'.*HINT"):
        _ = ImageTextDataModule(path, tokenizer="hf-hub:nobody/nothing").tokenizer
