"""The image data modules transform images as the model's backbone says: timm's create_transform from its data
config, open_clip's own transform from its preprocess config; explicit values still override, an image size the
model cannot take stops naming the key, and timm's training augmentations (RandAugment, random erasing, mixup) are
timm's own. Issue 23, item 2: a pretrained ViT (mean and std 0.5, crop_pct 0.9, bicubic) got ImageNet statistics."""
import lightning as L
import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from lit_lowrank.backbones import open_clip_backbone, timm_backbone
from lit_lowrank.data import DigitsDataModule, ImageFolderDataModule
from lit_lowrank.data.images import IMAGENET_MEAN, IMAGENET_STD
from lit_lowrank.tasks import ImageClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = dict(img_size=32, num_classes=2, model_kwargs=dict(patch_size=8, embed_dim=16, depth=1, num_heads=2))


def vit(**extra):
    return timm_backbone("vit_tiny_patch16_224", **{**TINY_VIT, **extra})


def image_folder(root):
    """Two classes of non-square noise images: resizing, cropping and normalisation all show in the pixels."""
    noise = np.random.default_rng(0).integers(0, 256, (4, 45, 37, 3), dtype=np.uint8)
    for i, name in enumerate(["cat", "cat", "dog", "dog"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise[i]).save(root / name / f"{i}.png")
    return str(root)


def first_validation_image(dm):
    dm.setup("fit")
    path, _ = dm.datasets["validation"].samples[0]
    return next(iter(dm.val_dataloader()))["images"][0], Image.open(path).convert("RGB")


def fit_one_step(task, dm):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)


def test_image_folder_builds_timms_transform_from_the_backbones_data_config(tmp_path):
    backbone = vit()
    root = image_folder(tmp_path / "train")
    dm = ImageFolderDataModule(root, val_dir=root, batch_size=4)
    fit_one_step(ImageClassificationTask(backbone), dm)  # the task hands its backbone's preprocessing over
    image, raw = first_validation_image(dm)
    # independent: timm's own data config of the model (at the size it was built for) and timm's own transform
    config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=backbone.model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 0.9 and config["interpolation"] == "bicubic"
    assert torch.allclose(image, timm.data.create_transform(**config)(raw))
    imagenet = timm.data.create_transform(**{**config, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})(raw)
    assert not torch.allclose(image, imagenet, atol=1e-2)  # what the data module used to give this model


def test_explicit_values_override_the_backbones(tmp_path):
    root = image_folder(tmp_path / "train")
    dm = ImageFolderDataModule(root, val_dir=root, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0,
                               interpolation="bilinear").use_model(vit())
    with pytest.warns(UserWarning, match=r"data\.init_args\.mean/std .* differ from the normalisation "
                                         r"'vit_tiny_patch16_224' was trained with"):
        image, raw = first_validation_image(dm)
    expected = timm.data.create_transform((3, 32, 32), interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                          crop_pct=1.0)(raw)
    assert torch.allclose(image, expected)


def test_an_image_size_the_model_cannot_take_stops_naming_the_key(tmp_path):
    root = image_folder(tmp_path / "train")
    task = ImageClassificationTask(vit())
    with pytest.raises(ValueError, match=r"data\.init_args\.image_size=16, but 'vit_tiny_patch16_224' takes 32x32 "
                                         r"images only.*HINT: leave data\.init_args\.image_size unset.*img_size: 16"):
        fit_one_step(task, ImageFolderDataModule(root, val_dir=root, image_size=16, batch_size=4))
    # a ViT built with dynamic_img_size takes other sizes: no error, and the size given is used
    dynamic = ImageFolderDataModule(root, val_dir=root, image_size=16).use_model(vit(dynamic_img_size=True))
    assert first_validation_image(dynamic)[0].shape == (3, 16, 16)


def test_training_augmentation_is_timms_own(tmp_path):
    root = image_folder(tmp_path / "train")
    dm = ImageFolderDataModule(root, val_dir=root, augment=True, auto_augment="rand-m9-mstd0.5-inc1",
                               random_erasing=0.25, augment_kwargs={"hflip": 0.0}).use_model(vit())
    dm.setup("fit")
    config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=dm.attached_model().model)
    expected = timm.data.create_transform(**config, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                          re_prob=0.25, hflip=0.0)
    assert str(dm.datasets["train"].transform) == str(expected) and "RandAugment" in str(expected)
    assert str(dm.datasets["validation"].transform) == str(timm.data.create_transform(**config))
    with pytest.raises(ValueError, match=r"\['auto_augment'\] change the training transform.*augment: true"):
        ImageFolderDataModule(root, auto_augment="rand-m9-mstd0.5-inc1")


class _LabelProbe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight, self.labels = torch.nn.Parameter(torch.zeros(1)), {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.labels["train"].append(batch["labels"])
        return self.weight.sum() + 0 * batch["images"].sum()

    def validation_step(self, batch, batch_idx):
        self.labels["val"].append(batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mixup_mixes_training_batches_only_and_the_task_trains_on_them(tmp_path):
    root = image_folder(tmp_path / "train")
    probe = _LabelProbe()
    fit_one_step(probe, ImageFolderDataModule(root, val_dir=root, image_size=8, batch_size=4, mixup_alpha=0.8,
                                              cutmix_alpha=1.0))
    (soft,), (hard,) = probe.labels["train"], probe.labels["val"]
    assert soft.shape == (4, 2) and soft.dtype == torch.float32 and torch.allclose(soft.sum(1), torch.ones(4))
    assert hard.dtype == torch.long and hard.shape == (4,)
    task = ImageClassificationTask(vit(), label_smoothing=0.1)
    fit_one_step(task, ImageFolderDataModule(root, val_dir=root, batch_size=4, mixup_alpha=0.8))
    assert task.trainer.global_step == 1


def test_open_clip_backbones_get_open_clips_own_transform(tmp_path):
    clip = open_clip_backbone(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1,
                                                           head_width=8),
                              text_cfg=dict(context_length=8, width=16, heads=2, layers=1))
    root = image_folder(tmp_path / "train")
    image, raw = first_validation_image(ImageFolderDataModule(root, val_dir=root).use_model(clip))
    expected = open_clip.image_transform(16, is_train=False)(raw)  # open_clip's defaults: OpenAI CLIP statistics
    assert torch.allclose(image, expected)
    digits = DigitsDataModule(batch_size=8).use_model(clip)
    digits.setup("test")
    images = next(iter(digits.test_dataloader()))["images"]
    background = torch.tensor(open_clip.OPENAI_DATASET_MEAN) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    assert images.shape[-2:] == (16, 16) and torch.allclose(images[:, :, 0, 0], -background.expand(8, 3), atol=1e-5)


def test_digits_take_the_timm_backbones_size_and_normalisation():
    dm = DigitsDataModule(batch_size=8).use_model(vit())
    dm.setup("test")
    images = next(iter(dm.test_dataloader()))["images"]
    assert images.shape == (8, 3, 32, 32) and images.min() == pytest.approx(-1.0)  # (0 - 0.5) / 0.5
    with pytest.raises(ValueError, match=r"image_size=16, but 'vit_tiny_patch16_224' takes 32x32"):
        DigitsDataModule(image_size=16).use_model(vit()).setup("test")
