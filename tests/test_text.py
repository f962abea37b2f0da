"""TextDataModule: the split rule, the embedded standard-library corpus, windows, token files and every bad input."""

import hashlib
import pickle
import platform
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fakes import write_token_bins
from lightning_recipes.datamodules import TextDataModule
from lightning_recipes.datamodules.text import STDLIB_EXCLUDED, TokenWindows, is_held_out, stdlib_files

NAMES = [f"{folder}/doc{i:02d}.txt" for folder in ("a", "b") for i in range(20)]


def _made_up_folder(root: Path) -> dict[str, bytes]:
    contents = {}
    for i, name in enumerate(NAMES):
        contents[name] = f"# {name}\n".encode() + bytes([65 + i % 26]) * (50 + i)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(contents[name])
    (root / "a" / "notes.md").write_text("not matched by the default glob")
    return contents


@pytest.mark.parametrize(
    ("val_percent", "held_out"),
    [
        # int(sha256("a/doc12.txt"), 16) % 100 == 1; the next ones are a/doc18 (6), a/doc05 (16), a/doc00 (22), ...
        (5, ["a/doc12.txt"]),
        (10, ["a/doc12.txt", "a/doc18.txt"]),
        (25, ["a/doc00.txt", "a/doc05.txt", "a/doc07.txt", "a/doc12.txt", "a/doc18.txt", "b/doc00.txt", "b/doc08.txt"]),
    ],
)
def test_a_folder_is_split_by_the_sha256_of_each_relative_path(tmp_path, val_percent, held_out):
    contents = _made_up_folder(tmp_path)
    data = TextDataModule(path=str(tmp_path), val_percent=val_percent, context_length=8, batch_size=2)
    assert sorted(data.held_out) == held_out
    assert all(is_held_out(name, val_percent) == (name in held_out) for name in NAMES)
    data.setup()
    # Each split is its files' bytes, whole, concatenated in sorted path order; the .md file is not read.
    train = b"".join(contents[n] for n in sorted(NAMES) if n not in held_out)
    val = b"".join(contents[n] for n in sorted(NAMES) if n in held_out)
    assert data.train_tokens.tobytes() == train and data.val_tokens.tobytes() == val
    assert (data.file_count, data.byte_count) == (40, len(train) + len(val))
    assert data.split_tokens == {"train": len(train), "val": len(val)}
    digest = hashlib.sha256()
    for name in sorted(NAMES):
        digest.update(name.encode() + b"\0" + str(len(contents[name])).encode() + b"\0" + contents[name])
    assert data.sha256 == digest.hexdigest()
    assert data.vocab_size == 256 and data.tokens_are_bytes


def test_a_single_file_holds_out_its_last_bytes(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(256)) * 4)  # 1,024 bytes
    data = TextDataModule(path=str(path), val_percent=10, context_length=16, batch_size=4)
    data.setup()
    # ceil(1024 x 10 / 100) = 103 bytes held out: the last ones.
    assert data.split_tokens == {"train": 921, "val": 103}
    assert data.val_tokens.tobytes() == path.read_bytes()[-103:]


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the figures of issue 12 are CPython 3.11.7's")
def test_the_embedded_corpus_is_this_pythons_standard_library():
    data = TextDataModule()
    assert (data.file_count, data.byte_count) == (674, 11_354_162)
    assert data.split_tokens == {"train": 10_948_087, "val": 406_075}  # 10.95 MB / 0.41 MB
    assert len(data.held_out) == 28
    data.setup()
    assert data.sha256 == "cae276e05e32454bdea40eab93d3ce38e5d3107b4678c31f2e435ee2bd09544d"
    assert data.describe()["python_version"] == "3.11.7"


def test_the_standard_library_rule_skips_test_idle_and_installed_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and all(path == root / rel for rel, path in files)
    assert all(rel.endswith(".py") and not STDLIB_EXCLUDED & set(rel.split("/")[:-1]) for rel, _ in files)
    relative = {rel for rel, _ in files}
    assert {"os.py", "json/decoder.py"} <= relative
    assert not any(rel.startswith(("test/", "idlelib/", "site-packages/")) for rel in relative)


def test_validation_windows_are_fixed_and_do_not_overlap_training_windows_start_anywhere():
    tokens = np.arange(103, dtype=np.uint16)
    val = TokenWindows(tokens, 10, random_offset=False)
    assert len(val) == 10  # (103 - 1) // 10
    for i in range(len(val)):
        inputs, targets = val[i]
        assert inputs.tolist() == list(range(10 * i, 10 * i + 10)) and targets.tolist() == list(range(10 * i + 1, 10 * i + 11))
        assert inputs.dtype == torch.int64
    train = TokenWindows(tokens, 10, random_offset=True)
    torch.manual_seed(0)
    starts = {i: [int(train[i][0][0]) for _ in range(200)] for i in range(len(train))}
    # Slot i starts anywhere in [10 i, 10 i + 9], the last one no later than 103 - 11 = 92 (a full window left).
    assert all(set(starts[i]) == set(range(10 * i, 10 * i + 10)) for i in range(9))
    assert set(starts[9]) == {90, 91, 92}
    torch.manual_seed(0)
    assert {i: [int(train[i][0][0]) for _ in range(200)] for i in range(len(train))} == starts  # seeded: the same windows
    inputs, targets = train[3]
    assert torch.equal(inputs[1:], targets[:-1])


def test_token_files_are_memory_mapped_uint16_and_pickle_without_copying(tmp_path):
    root = write_token_bins(tmp_path, vocab_size=1000, train_tokens=300, val_tokens=100)
    data = TextDataModule(path=root, vocab_size=1000, context_length=16, batch_size=4)
    assert not data.tokens_are_bytes and data.vocab_size == 1000 and data.split_tokens == {"train": 300, "val": 100}
    data.setup()
    assert isinstance(data.train_tokens, np.memmap) and data.train_tokens.dtype == np.uint16
    expected = np.fromfile(Path(root, "val.bin"), dtype=np.uint16)
    inputs, targets = next(iter(data.val_dataloader()))
    assert inputs.shape == (4, 16) and inputs[0].tolist() == expected[:16].tolist()
    dataset = data.train_dataloader().dataset
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives: the file name, not the tokens
    assert len(pickle.dumps(dataset)) < 1000 and isinstance(copy.tokens, np.memmap)
    assert np.array_equal(copy.tokens, data.train_tokens)
    assert data.encode("5 999").tolist() == [[5, 999]] and data.decode(torch.tensor([5, 999])) == "5 999"


def test_prompts_encode_as_bytes_and_default_to_the_held_out_text(tmp_path):
    _made_up_folder(tmp_path)
    data = TextDataModule(path=str(tmp_path), context_length=8, batch_size=2)
    assert data.encode("é!").tolist() == [[0xC3, 0xA9, 0x21]]
    assert data.decode(torch.tensor([0xC3, 0xA9, 0xFF])) == "é\ufffd"  # an invalid byte shows as the replacement character
    assert data.decode(data.prompt_tokens()) == "# a/doc1"  # the first min(16, context) bytes held out
    assert next(iter(TextDataModule(path=str(tmp_path), prompt="def ", context_length=8, batch_size=2).predict_dataloader())).tolist() == [
        [100, 101, 102, 32]
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"path": "{tmp}/missing"}, FileNotFoundError, r"--data.path=.*missing does not exist: give a text file, a folder"),
        ({"path": "{tmp}/empty"}, FileNotFoundError, r"--data.path=.*empty has no file matching --data.glob='\*\*/\*.txt'"),
        ({"path": "{tmp}/blank"}, ValueError, r"--data.path=.*blank holds only empty files \(2\): give text"),
        ({"path": "{tmp}/text", "context_length": 64}, ValueError,
         r"the held-out split of .*text has 62 tokens, fewer than one window of context_length \+ 1 = 65: lower "
         r"--data.context_length to at most 61, or give more text \(more files, or a different --data.val_percent\)"),
        # 1,128 training bytes: (1128 - 1) // 16 = 70 windows.
        ({"path": "{tmp}/text", "batch_size": 100}, ValueError,
         r"training split of .*text has 70 windows of context_length=16 tokens, fewer than one batch: lower "
         r"--data.batch_size=100 to at most 70"),
        ({"path": "{tmp}/text", "vocab_size": 300}, ValueError, r"vocab_size=300 is for train.bin / val.bin .* drop --data.vocab_size"),
        ({"path": "{tmp}/odd"}, ValueError, r"--data.path=.*odd holds train.bin: give the vocabulary of its tokenizer"),
        ({"path": "{tmp}/odd", "vocab_size": 100}, ValueError,
         r"train.bin has 201 bytes, not a whole number of uint16 tokens: .*np.array\(ids, dtype=np.uint16\)"),
        ({"path": "{tmp}/bins", "vocab_size": 70000}, ValueError, r"vocab_size=70000 is invalid: uint16 token files .* \(--data.vocab_size\)"),
        ({"context_length": 0}, ValueError, r"context_length=0 is invalid: use an int >= 1 \(--data.context_length\)"),
        ({"val_percent": 100}, ValueError, r"val_percent=100 is invalid: use an int from 1 to 99 \(--data.val_percent\)"),
        ({"batch_size": 0}, ValueError, r"batch_size=0 is invalid: use an int >= 1 \(--data.batch_size\)"),
    ],
)
def test_bad_input_fails_at_construction_naming_option_value_and_fix(tmp_path, kwargs, error, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("")
    (tmp_path / "text").mkdir()
    for name in NAMES[:20]:  # a/doc12.txt (62 bytes) is the only one held out at 5 %
        (tmp_path / "text" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "text" / name).write_bytes(b"x" * (50 + int(name[-6:-4])))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\0" * 201)
    (tmp_path / "odd" / "val.bin").write_bytes(b"\0" * 200)
    write_token_bins(tmp_path / "bins", vocab_size=100, train_tokens=100, val_tokens=50)
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        TextDataModule(**{"context_length": 16, **kwargs})


def test_a_token_id_past_the_vocabulary_fails_at_setup(tmp_path):
    root = write_token_bins(tmp_path, vocab_size=1000, train_tokens=300, val_tokens=100)
    data = TextDataModule(path=root, vocab_size=500, context_length=16, batch_size=4)
    with pytest.raises(ValueError, match=r"train.bin holds token id 99\d, but --data.vocab_size=500: give the tokenizer's vocabulary \(at least 99\d\)"):
        data.setup("fit")
    with pytest.raises(ValueError, match=r"prompt='x y' is not a list of token ids: with .bin data give ids from 0 to 499"):
        data.encode("x y")
