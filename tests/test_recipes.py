import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.common import param_groups
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.resnet import main as resnet_main
from lightning_recipes.recipes.vit import ViTClassifier
from lightning_recipes.recipes.vit import main as vit_main


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_vit_param_groups_exclude_norms_biases_pos_embedding_and_class_token():
    module = ViTClassifier(depth=2, width=32, heads=2, mlp_dim=64)
    optimizer = module.build_optimizer()
    decay, no_decay = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    model = module.model
    assert _names(model, no_decay) == {n for n, p in model.named_parameters() if p.ndim < 2} | {
        "class_token",
        "encoder.pos_embedding",
    }
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in _names(model, decay)
    assert "conv_proj.weight" in _names(model, decay) and "heads.head.weight" in _names(model, decay)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_vit_sgd_option_keeps_the_parameter_groups_and_rejects_the_other_optimizers_settings():
    optimizer = ViTClassifier(depth=1, width=32, heads=2, mlp_dim=64, optimizer="sgd", momentum=0.8).build_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.defaults["momentum"], optimizer.defaults["nesterov"]) == (0.8, True)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match=r"betas=\(0.9, 0.95\) is an AdamW setting but optimizer='sgd'"):
        ViTClassifier(optimizer="sgd", betas=(0.9, 0.95))
    with pytest.raises(ValueError, match="momentum=0.5 is an SGD setting but optimizer='adamw'"):
        ViTClassifier(momentum=0.5)
    with pytest.raises(ValueError, match="optimizer='lamb' is not supported"):
        ViTClassifier(optimizer="lamb")


def test_resnet_param_groups_decay_only_conv_and_linear_weights():
    module = ResNetClassifier(arch="resnet18")
    optimizer = module.build_optimizer()
    decay, no_decay = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"] is True
    assert optimizer.defaults["momentum"] == 0.9
    weights = {
        f"{name}.weight" for name, m in module.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert _names(module.model, decay) == weights
    assert "bn1.weight" in _names(module.model, no_decay) and "fc.bias" in _names(module.model, no_decay)


def test_param_groups_reject_unknown_names():
    with pytest.raises(ValueError, match=r"no_decay names \['pos_embed'\] are not parameters of Linear"):
        param_groups(nn.Linear(2, 2), 0.1, no_decay=["pos_embed"])


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ResNetClassifier, {"arch": "resnet19"}, r"arch='resnet19' is not supported: choose one of \['resnet18'"),
        (ResNetClassifier, {"norm": "layer"}, r"norm='layer' is not supported"),
        (ResNetClassifier, {"stem": "tiny"}, r"stem='tiny' is not supported"),
        (ResNetClassifier, {"stem": "imagenet", "stem_stride": 2}, r"stem_stride=2 is invalid with stem='imagenet': use 1, or 2 with stem='small' \(--model.stem_stride 1;"),
        (ViTClassifier, {"patch_size": 4, "image_size": 16, "conv_stem": [32]}, r"conv_stem=\[32\] with patch_size=4: .* at least log2.*; or --model.conv_stem null for the standard patchify"),
        (ResNetClassifier, {"norm": "group", "group_norm_groups": 7}, r"group_norm_groups=7 must divide"),
        (ViTClassifier, {"image_size": 8, "patch_size": 3}, r"patch_size=3 does not divide image_size=8: .*\[1, 2, 4, 8\]"),
        (ViTClassifier, {"width": 100, "heads": 8}, r"heads=8 does not divide width=100"),
        (ViTClassifier, {"num_classes": 1}, r"num_classes=1 is invalid"),
        (ViTClassifier, {"label_smoothing": 1.0}, r"label_smoothing=1.0 is invalid"),
    ],
)
def test_bad_model_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_num_classes_disagreeing_with_data_fails_before_training(tmp_path):
    model = ViTClassifier(num_classes=5, depth=1, width=16, heads=2, mlp_dim=16)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"model num_classes=5 disagrees with the data: DigitsDataModule.num_classes=10"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_sync_batch_warns_in_a_single_process(tmp_path):
    model = ResNetClassifier(norm="sync_batch")
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"norm='sync_batch' has nothing to synchronise in a single process"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=8))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


FAST = ["--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("main", [vit_main, resnet_main], ids=["vit", "resnet"])
def test_cli_fit_then_validate_test_predict(main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *FAST, "--data.batch_size=16"])
    # ResumableCheckpoint writes to <default_root_dir>/checkpoints, the logger to runs/<name>/version_N.
    (last,) = tmp_path.glob("runs/*/checkpoints/last.ckpt")
    (run_dir,) = tmp_path.glob("runs/*/version_0")
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = set(accumulator.Tags()["scalars"])
    # The default config's callbacks: LRSchedule names the recipe's two parameter groups, GradNormMonitor logs.
    assert {"train/loss", "train/acc", "lr/decay", "lr/no_decay", "grad_norm/total", "grad_norm/total_post_clip"} <= logged
    last = str(last)
    for sub in ("validate", "test", "predict"):
        main([sub, f"--ckpt_path={last}", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
              "--trainer.limit_predict_batches=2", "--trainer.enable_progress_bar=false"])


def test_cli_links_data_sizes_into_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vit_main(["fit", "--data.image_size=16", "--model.patch_size=4", "--print_config"])
    assert exit_info.value.code == 0
    config = capsys.readouterr().out
    assert "class_path: lightning_recipes.datamodules.DigitsDataModule" in config
    assert "image_size: 16" in config and "patch_size: 4" in config


def test_cli_missing_image_folder_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as info:
        resnet_main(["fit", "--data=ImageFolderDataModule", f"--data.root={missing}", *FAST])
    message = str(info.value) + capsys.readouterr().err
    assert str(missing) in message


def test_vit_rejects_a_train_crop_different_from_the_val_crop(tmp_path):
    from data_fakes import write_tree

    root = write_tree(tmp_path / "images")
    with pytest.raises(ValueError, match=r"data train_crop_size=16 differs from image_size=32"):
        vit_main(["fit", "--data=ImageFolderDataModule", f"--data.root={root}", "--data.train_crop_size=16",
                  "--data.val_resize_size=32", "--data.val_crop_size=32", "--model.patch_size=8", "--model.conv_stem=null", *FAST,
                  f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])


def test_sync_batch_under_ddp_on_cpu_uses_the_gloo_capable_batchnorm():
    from types import SimpleNamespace

    from lightning_recipes.recipes.sync_batchnorm import GlobalBatchNorm2d

    model = ResNetClassifier(norm="sync_batch")
    weight = model.model.bn1.weight
    # What module.setup() sees of a 2-process CPU DDP Trainer (a real one would spawn processes).
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")), datamodule=None)
    model.setup("fit")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(type(m) is GlobalBatchNorm2d for m in norms)
    assert model.model.bn1.weight is weight  # the optimizer's parameters are the same objects


def test_accuracy_is_the_share_of_correct_predictions_not_a_class_average():
    module = ResNetClassifier()
    targets = torch.tensor([0, 0, 0, 1])
    logits = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 10).float()  # always predicts 0
    # 3 of 4 right; the macro average over the 2 classes present would say 0.5.
    assert module.val_acc(logits, targets).item() == 0.75


@pytest.mark.parametrize("model_class", [ViTClassifier, ResNetClassifier])
def test_load_from_checkpoint_outside_a_trainer(model_class, tmp_path):
    # Lightning calls configure_model while loading, with no Trainer attached.
    module = model_class(depth=1, width=32, heads=2, mlp_dim=64) if model_class is ViTClassifier else model_class()
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = model_class.load_from_checkpoint(tmp_path / "model.ckpt")
    for (name, expected), actual in zip(module.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name
