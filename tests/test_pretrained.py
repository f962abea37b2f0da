"""Pretrained weights: offline reads from a fake torch hub cache or a file, head replacement, position-embedding
interpolation, the error messages, and timm's layer-wise LR decay applied through LRSchedule."""

import logging
import re

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning_recipes.callbacks import LRSchedule
from lightning_recipes.callbacks.lr_schedule import lr_factor
from lightning_recipes.recipes import pretrained
from lightning_recipes.recipes.pretrained import (
    RESNETS,
    VITS,
    cache_path,
    layer_decay_groups,
    load_pretrained,
    resolve_weights,
    vit_arch,
)
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import ResNet18_Weights, VisionTransformer, ViT_B_16_Weights, get_model, resnet18
from torchvision.models.vision_transformer import interpolate_embeddings

TINY = {"patch_size": 2, "depth": 3, "width": 16, "heads": 2, "mlp_dim": 32}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation, which costs seconds on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(image_size=8, num_classes=1000, seed=0, **options):
    torch.manual_seed(seed)
    o = {**TINY, **options}
    vit = VisionTransformer(image_size, o["patch_size"], o["depth"], o["heads"], o["width"], o["mlp_dim"],
                            num_classes=num_classes)  # fmt: skip
    # torchvision zero-initialises the head: give it values, so that "kept" and "replaced" differ.
    torch.nn.init.normal_(vit.heads.head.weight)
    return vit


def clone_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_loaded(model, source, except_keys=()):
    state = model.state_dict()
    for key, value in source.items():
        if key not in except_keys:
            assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def resnet_cache(tmp_path_factory):
    """A torch hub cache holding a random resnet18 under the file name of ResNet18_Weights.IMAGENET1K_V1."""
    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(1)
    source = resnet18()
    path = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    return home, clone_state(source)


def test_the_cache_file_name_is_the_one_torchvision_downloads_to(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cache_path(ResNet18_Weights.IMAGENET1K_V1) == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert ResNet18_Weights.IMAGENET1K_V1.url.endswith("/resnet18-f37072fd.pth")


def test_the_architecture_tables_match_torchvisions_builders():
    for name, options in VITS.items():
        with torch.device("meta"):
            vit = get_model(name)
        assert vit_arch(vit) == name
        assert options == pretrained._vit_options(vit)
    for name in RESNETS:
        with torch.device("meta"):
            state = get_model(name).state_dict()
        assert pretrained._options("resnet", state, {}, None)["arch"] == name


def test_weights_names_resolve_to_the_enum_member():
    member = ResNet18_Weights.IMAGENET1K_V1
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", "ResNet18_Weights.DEFAULT"):
        assert resolve_weights("resnet18", name) is member
    assert resolve_weights(None, "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1") is ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1


WRONG_NAMES = [
    ("resnet18", "IMAGENET1K_V2", "is not a weights name of resnet18: ResNet18_Weights has IMAGENET1K_V1, DEFAULT."),
    ("resnet18", "ResNet18_Weights.V3", "='ResNet18_Weights.V3': ResNet18_Weights has IMAGENET1K_V1, DEFAULT."),
    ("resnet18", "Resnet18_Weights.DEFAULT", "no weights enum 'Resnet18_Weights'; full names look like ResNet18_W"),
    (None, "IMAGENET1K_V1", "='IMAGENET1K_V1' is a weights name without its architecture"),
    ("resnet18", "", "--model.weights='' is invalid"),
]


@pytest.mark.parametrize(("arch", "weights", "match"), WRONG_NAMES)
def test_a_wrong_weights_name_lists_the_names(arch, weights, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        resolve_weights(arch, weights)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"--model.weights='{tmp_path}/run/last.ckpt': no such")):
        resolve_weights("resnet18", f"{tmp_path}/run/last.ckpt")
    with pytest.raises(ValueError, match="is a directory"):
        resolve_weights("resnet18", str(tmp_path))


@pytest.mark.parametrize("num_classes", [7, 1000])
def test_resnet18_loads_from_the_cache_and_replaces_the_head_for_other_classes(
    resnet_cache, monkeypatch, caplog, num_classes
):
    home, source = resnet_cache
    monkeypatch.setenv("TORCH_HOME", str(home))
    torch.manual_seed(2)
    model = resnet18(num_classes=num_classes)
    fresh = clone_state(model)
    assert not torch.equal(fresh["conv1.weight"], source["conv1.weight"])
    with caplog.at_level(logging.INFO):
        replaced = load_pretrained(model, "IMAGENET1K_V1", arch="resnet18")
    head = ("fc.weight", "fc.bias")
    assert_loaded(model, source, except_keys=head if num_classes == 7 else ())
    if num_classes == 7:
        assert replaced == list(head)
        assert torch.equal(model.fc.weight, fresh["fc.weight"]) and model.fc.out_features == 7
        assert "fc.weight, fc.bias kept freshly initialised for 7 classes (the weights' head has 1000)" in caplog.text
    else:
        assert replaced == [] and "freshly" not in caplog.text


def test_a_weights_name_missing_from_the_cache_fails_with_its_path_and_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    command = ('python -c "from torchvision.models import ResNet18_Weights as W; '
               'W.IMAGENET1K_V1.get_state_dict(progress=True)"')  # fmt: skip
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained(resnet18(), "DEFAULT", arch="resnet18")
    message = str(error.value)
    assert f"{path} does not exist" in message and command in message
    assert "TORCH_HOME moves it" in message and "weights=None" in message
    assert not (tmp_path / "hub").exists()  # nothing was downloaded, not even a folder made


def test_an_option_the_weights_rule_out_is_named_before_the_cache_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the options are checked first
    model = resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # the recipe's small stem, on 1-channel digits
    match = ("ResNet50_Weights.IMAGENET1K_V2 are for another network. The weights are arch='resnet50', "
             "stem='imagenet', in_channels=3, norm='batch'; the model is arch='resnet18', stem='small', "
             "in_channels=1, norm='batch': set --model.arch resnet50 --model.stem imagenet and use 3-channel images")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(match)):
        load_pretrained(model, "ResNet50_Weights.IMAGENET1K_V2", arch="resnet18")
    with torch.device("meta"):  # a ViT-B/16 but for its heads: shapes cannot tell, the options can
        vit = VisionTransformer(224, 16, 12, 4, 768, 3072)
    with pytest.raises(ValueError, match=re.escape("the model is patch_size=16, depth=12, width=768, heads=4, "
                                                   "mlp_dim=3072, conv_stem=None, in_channels=3: set --model.heads 12")):  # fmt: skip
        load_pretrained(vit, "ViT_B_16_Weights.IMAGENET1K_V1")


def test_weights_of_an_architecture_the_recipe_cannot_build_are_refused():
    match = ("--model.weights='ResNet101_Weights.DEFAULT': ResNet101_Weights.IMAGENET1K_V2 are weights for resnet101, "
             "and the ResNet recipe builds resnet18, resnet34, resnet50.")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(match)):
        load_pretrained(resnet18(), "ResNet101_Weights.DEFAULT", arch="resnet18")
    with pytest.raises(ValueError, match=re.escape("are weights for resnet18, and the model is a ViT.")):
        load_pretrained(tiny_vit(), "ResNet18_Weights.DEFAULT")


def test_a_vit_matching_no_torchvision_vit_lists_their_options_for_a_short_name():
    match = ("--model.weights='IMAGENET1K_V1' names torchvision weights, but the ViT (patch_size=2, depth=3, "
             "width=16, heads=2, mlp_dim=32) is none of torchvision's: vit_b_16 is --model.patch_size 16 "
             "--model.depth 12 --model.width 768 --model.heads 12 --model.mlp_dim 3072;")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(match)):
        load_pretrained(tiny_vit(), "IMAGENET1K_V1")


def test_shape_mismatches_name_the_tensor_both_shapes_and_the_option(resnet_cache, tmp_path):
    _, source = resnet_cache
    torch.save(source, tmp_path / "r18.pt")
    model = resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    match = ("'conv1.weight' is (64, 3, 7, 7) in the weights but (64, 1, 3, 3) in the model. The weights are "
             "arch='resnet18', stem='imagenet', in_channels=3, norm='batch'; the model is arch='resnet18', stem='small', "
             "in_channels=1, norm='batch': set --model.stem imagenet and use 3-channel images")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(match)):
        load_pretrained(model, str(tmp_path / "r18.pt"), arch="resnet18")

    torch.save(tiny_vit().state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=re.escape("'class_token' is (1, 1, 16) in the weights but (1, 1, 8) in the "
                                                   "model.") + ".*set --model.width 16 --model.mlp_dim 32\\.$"):  # fmt: skip
        load_pretrained(tiny_vit(width=8, mlp_dim=16), str(tmp_path / "vit.pt"))
    with pytest.raises(ValueError, match=re.escape("the model lacks 'encoder.layers.encoder_layer_2.ln_1.weight' and "
                                                   "11 more.") + ".*set --model.depth 3\\.$"):  # fmt: skip
        load_pretrained(tiny_vit(depth=2), str(tmp_path / "vit.pt"))
    with pytest.raises(ValueError, match=re.escape("'conv_proj.weight' is (16, 3, 2, 2) in the weights but "
                                                   "(16, 3, 4, 4) in the model") + ".*set --model.patch_size 2\\.$"):  # fmt: skip
        load_pretrained(tiny_vit(patch_size=4), str(tmp_path / "vit.pt"))


def test_a_tiny_vit_under_the_enums_file_name_loads_with_its_position_embedding_interpolated(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(VITS, "vit_b_16", dict(TINY))  # the tiny ViT stands for a ViT-B/16 (its file would be 330 MB)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = tiny_vit(image_size=8)
    path = tmp_path / "hub" / "checkpoints" / "vit_b_16-c867db91.pth"
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = tiny_vit(image_size=12, num_classes=5, seed=3)
    fresh = clone_state(model)
    with caplog.at_level(logging.INFO):
        assert load_pretrained(model, "IMAGENET1K_V1") == ["heads.head.weight", "heads.head.bias"]
    assert "position embedding resized from (1, 17, 16) to (1, 37, 16) for image_size=12." in caplog.text
    pos = "encoder.pos_embedding"
    assert_loaded(model, clone_state(source), except_keys=("heads.head.weight", "heads.head.bias", pos))
    assert torch.equal(model.heads.head.weight, fresh["heads.head.weight"])
    assert model.encoder.pos_embedding.shape == (1, 6 * 6 + 1, 16)  # a 4x4 grid of 2-px patches resized to 6x6
    expected = interpolate_embeddings(12, 2, clone_state(source))[pos]
    assert torch.equal(model.encoder.pos_embedding, expected)
    assert torch.equal(model.encoder.pos_embedding[:, 0], source.encoder.pos_embedding[:, 0])  # the class token's


class TinyViTModule(LightningModule):
    """A recipe's layout (``self.model``) with its options in the hyperparameters, as ViTClassifier saves them."""

    def __init__(self, heads: int = 2, layer_decay: float = 1.0, lr: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_vit(heads=heads)
        self.lrs = []

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).square().mean()

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        skip = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.1, "name": "decay"},
                  {"params": skip, "weight_decay": 0.0, "name": "no_decay"}]  # fmt: skip
        return torch.optim.AdamW(layer_decay_groups(self.model, groups, layer_decay=self.hparams.layer_decay,
                                                    lr=self.hparams.lr))  # fmt: skip

    def on_before_optimizer_step(self, optimizer):  # after LRSchedule's own hook has set this step's LRs
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def fit(module, steps, callbacks=()):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8)), batch_size=2)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, data)
    return trainer


def test_a_lightning_checkpoint_loads_its_model_tensors_and_its_recorded_heads_are_checked(tmp_path):
    module = TinyViTModule(heads=2, lr=1e-3)
    trainer = fit(module, steps=1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    model = tiny_vit(num_classes=10, seed=5)
    assert load_pretrained(model, str(tmp_path / "run.ckpt")) == ["heads.head.weight", "heads.head.bias"]
    assert_loaded(model, clone_state(module.model), except_keys=("heads.head.weight", "heads.head.bias"))
    assert not torch.equal(model.heads.head.weight[:2], module.model.heads.head.weight[:2])
    match = f"{tmp_path / 'run.ckpt'} holds another network. The weights are patch_size=2, depth=3, width=16, heads=2"
    with pytest.raises(ValueError, match=re.escape(match) + ".*set --model.heads 2\\.$"):
        load_pretrained(tiny_vit(heads=4), str(tmp_path / "run.ckpt"))


@pytest.mark.parametrize("layout", ["torchvision_reference", "ddp_prefix", "legacy_mlp_names"])
def test_other_state_dict_layouts_load(tmp_path, layout):
    source = tiny_vit()
    state = clone_state(source)
    if layout == "torchvision_reference":  # references/classification/train.py: {"model": ..., "optimizer": ...}
        content = {"model": state, "epoch": 3, "args": None}
    elif layout == "ddp_prefix":
        content = {f"module.{k}": v for k, v in state.items()}
    else:  # torchvision < 0.14 named the MLP's linears linear_1 / linear_2
        content = {re.sub(r"mlp\.([03])\.", lambda m: f"mlp.linear_{int(m[1]) // 3 + 1}.", k): v
                   for k, v in state.items()}  # fmt: skip
        assert "encoder.layers.encoder_layer_0.mlp.linear_2.bias" in content
    torch.save(content, tmp_path / "w.pth")
    model = tiny_vit(seed=9)
    assert load_pretrained(model, str(tmp_path / "w.pth")) == []
    assert_loaded(model, state)


def test_load_pretrained_refuses_another_model_and_a_file_that_is_no_state_dict(tmp_path):
    with pytest.raises(TypeError, match="loads into a torchvision ResNet or VisionTransformer, not Linear"):
        load_pretrained(torch.nn.Linear(2, 2), "DEFAULT")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="the file holds no state dict"):
        load_pretrained(tiny_vit(), str(tmp_path / "list.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=re.escape("junk.pt does not load with torch.load(weights_only=True)")):
        load_pretrained(tiny_vit(), str(tmp_path / "junk.pt"))


def expected_layer_id(name: str) -> int:
    """timm's ids for depth 3, written out: stem 0, block i -> i + 1, final norm and head 4."""
    if name in ("class_token", "encoder.pos_embedding", "conv_proj.weight", "conv_proj.bias"):
        return 0
    for i in range(3):
        if name.startswith(f"encoder.layers.encoder_layer_{i}."):
            return i + 1
    assert name in ("encoder.ln.weight", "encoder.ln.bias", "heads.head.weight", "heads.head.bias"), name
    return 4


def test_layer_decay_groups_follow_timms_formula():
    vit = tiny_vit()
    decay = [p for n, p in vit.named_parameters() if p.ndim >= 2]
    skip = [p for n, p in vit.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05, "name": "decay"},
              {"params": skip, "weight_decay": 0.0, "name": "no_decay"}]  # fmt: skip
    split = layer_decay_groups(vit, groups, layer_decay=0.65, lr=2e-3)
    where = {id(p): g for g in split for p in g["params"]}
    assert sum(len(g["params"]) for g in split) == len(where) == len(list(vit.parameters()))
    for name, param in vit.named_parameters():
        group, layer = where[id(param)], expected_layer_id(name)
        kind = "decay" if param.ndim >= 2 else "no_decay"
        # timm: layer_scales[layer_id] = layer_decay ** (layer_max - layer_id), layer_max = depth + 1
        assert group["lr_scale"] == 0.65 ** (4 - layer) and group["lr"] == 2e-3 * 0.65 ** (4 - layer)
        assert group["name"] == f"layer{layer}/{kind}"
        assert group["weight_decay"] == (0.05 if kind == "decay" else 0.0)
    assert [g["name"] for g in split][:3] == ["layer0/decay", "layer0/no_decay", "layer1/decay"]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"layer_decay={bad!r} is invalid: use a value in (0, 1]; "
                                                       "1 disables it (--model.layer_decay).")):  # fmt: skip
            layer_decay_groups(vit, groups, layer_decay=bad, lr=1e-3)


def test_lr_schedule_keeps_the_layer_decay_ratios_through_warmup_and_decay():
    module = TinyViTModule(layer_decay=0.5, lr=0.01)
    fit(module, steps=6, callbacks=[LRSchedule(warmup_steps=2, warmup_start_factor=0.1, decay="cosine")])
    depth = TINY["depth"]
    bases = [0.01 * 0.5 ** (depth + 1 - layer) for layer in range(depth + 2) for _ in ("decay", "no_decay")]
    assert len(module.lrs) == 6 and len(module.lrs[0]) == len(bases)
    for step, lrs in enumerate(module.lrs):
        factor = lr_factor(step, total_steps=6, warmup_steps=2, warmup_start_factor=0.1)
        assert lrs == [base * factor for base in bases], step
        assert lrs[0] / lrs[-1] == pytest.approx(0.5 ** (depth + 1))


# ------------------------------------------------------------------------------ the recipes' --model.weights


def test_resnet_recipe_starts_from_a_weights_file_and_keeps_a_fresh_head_for_other_classes(tmp_path):
    from lightning_recipes.recipes.resnet import ResNetClassifier

    torch.manual_seed(3)
    source = ResNetClassifier(num_classes=10, in_channels=1)
    path = tmp_path / "digits_resnet.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(4)
    fresh = ResNetClassifier(num_classes=5, in_channels=1)
    torch.manual_seed(4)
    module = ResNetClassifier(num_classes=5, in_channels=1, weights=str(path))
    assert module.hparams.weights == str(path)
    assert_loaded(module.model, clone_state(source.model), except_keys=("fc.weight", "fc.bias"))
    # The head is the one this seed initialises without weights, not the file's 10-class head.
    assert torch.equal(module.model.fc.weight, fresh.model.fc.weight) and module.model.fc.weight.shape[0] == 5
    # Another stem does not fit: the error names the tensor and the option.
    with pytest.raises(ValueError, match=r"--model.weights=.*does not fit the model: 'conv1.weight'"):
        ResNetClassifier(num_classes=10, in_channels=1, stem="imagenet", weights=str(path))


def test_resnet_recipe_reads_a_torchvision_name_from_the_cache(resnet_cache, monkeypatch):
    from lightning_recipes.recipes.resnet import ResNetClassifier

    home, state = resnet_cache
    monkeypatch.setenv("TORCH_HOME", str(home))
    module = ResNetClassifier(num_classes=7, in_channels=3, stem="imagenet", weights="IMAGENET1K_V1")
    assert_loaded(module.model, state, except_keys=("fc.weight", "fc.bias"))
    # The digits defaults (1 channel, small stem) cannot take ImageNet weights: refused before the cache is read.
    monkeypatch.setenv("TORCH_HOME", str(home / "empty"))
    with pytest.raises(ValueError, match=r"--model.weights='IMAGENET1K_V1'.*--model.stem imagenet"):
        ResNetClassifier(num_classes=10, in_channels=1, weights="IMAGENET1K_V1")


def test_vit_recipe_loads_a_file_for_another_image_size_and_splits_groups_by_layer_decay(tmp_path):
    from lightning_recipes.recipes.vit import ViTClassifier

    options = {"patch_size": 2, "depth": 2, "width": 16, "heads": 2, "mlp_dim": 32, "in_channels": 1}
    torch.manual_seed(0)
    source = ViTClassifier(image_size=8, num_classes=10, **options)
    state = clone_state(source.model)
    path = tmp_path / "vit.pt"
    torch.save(state, path)
    module = ViTClassifier(image_size=12, num_classes=10, weights=str(path), layer_decay=0.5, lr=0.01, **options)
    expected = dict(state)
    interpolate_embeddings(12, 2, expected)
    assert expected["encoder.pos_embedding"].shape == (1, 37, 16)
    assert_loaded(module.model, expected)
    groups = module.build_optimizer().param_groups
    names = [g["name"] for g in groups]
    assert names[:2] == ["layer0/decay", "layer0/no_decay"] and names[-1] == "layer3/no_decay"
    for group in groups:
        layer = int(group["name"].split("/")[0][len("layer"):])
        assert group["lr"] == 0.01 * 0.5 ** (3 - layer)
        assert group["weight_decay"] == (0.05 if group["name"].endswith("/decay") else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(module.model.parameters()))
    # Without layer_decay: the recipe's two groups, one LR.
    assert [g["name"] for g in source.build_optimizer().param_groups] == ["decay", "no_decay"]
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"--model.layer_decay")):
            ViTClassifier(layer_decay=bad, **options)


def test_cli_fine_tunes_from_a_weights_file(tmp_path, monkeypatch):
    """``--model.weights`` through the CLI: validating the file's weights gives the checkpoint's own numbers."""
    from lightning_recipes.recipes.common import run_cli
    from lightning_recipes.recipes.vit import ViTClassifier

    def vit_main(args):
        return run_cli(ViTClassifier, "vit_digits.yaml", args=args)

    monkeypatch.chdir(tmp_path)
    tiny = ["--trainer.enable_progress_bar=false", "--data.batch_size=8", "--model.depth=1", "--model.width=32",
            "--model.heads=2", "--model.mlp_dim=32", "--trainer.limit_val_batches=2"]  # fmt: skip
    vit_main(["fit", *tiny, "--trainer.max_steps=2"])
    (last,) = tmp_path.glob("runs/*/checkpoints/last.ckpt")

    def val_loss(*args):
        cli = vit_main(["validate", *tiny, *args])
        return cli.trainer.callback_metrics["val/loss"].item()

    restored = val_loss(f"--ckpt_path={last}")
    assert val_loss(f"--model.weights={last}", "--model.layer_decay=0.7") == restored
    assert val_loss() != restored  # the seed's fresh weights
    with pytest.raises(FileNotFoundError, match=r"--model.weights='.*nowhere.pt': no such file"):
        vit_main(["fit", *tiny, f"--model.weights={tmp_path / 'nowhere.pt'}"])
