import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mi_prun.calibration import CalibrationSpec, calibration_batches, read_text_source, windows_from_ids
from mi_prun.errors import UserError


def test_file_formats_read_the_same_text(tmp_path):
    texts = ["first document", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    expected = "\n\n".join(texts)
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        assert read_text_source(str(tmp_path / name)) == expected


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("bad.jsonl", "{not json", "not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}', "field 'text'"),
        ("latin.txt", b"\xff\xfe\xfa", "not UTF-8"),
        ("broken.parquet", b"PAR1garbage", "cannot read"),
    ],
)
def test_unreadable_sources_give_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_text_source(str(path))


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load dataset"):
        read_text_source("no-such-owner/no-such-dataset")


def test_windows_are_spread_and_checked():
    ids = torch.arange(1000)
    w = windows_from_ids(ids, 4, 100)
    assert w.shape == (4, 100) and w[0, 0] == 0 and w[-1, 0] == 900
    with pytest.raises(UserError, match="fewer than one window"):
        windows_from_ids(torch.arange(10), 1, 100)
    with pytest.raises(UserError, match="--n-samples"):
        windows_from_ids(ids, 11, 100)


def test_empty_and_short_text(tiny_models, tmp_path):
    from mi_prun.load import load_model

    loaded = load_model(str(tiny_models["llama"]))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="empty"):
        calibration_batches(loaded, CalibrationSpec(str(tmp_path / "empty.txt"), 2, 32))
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_batches(loaded, CalibrationSpec(str(tmp_path / "short.txt"), 2, 32))


def test_distinct_ngram_ratio_sees_repetition():
    from mi_prun.calibration import distinct_ngram_ratio

    varied = torch.arange(40).reshape(2, 20)
    looping = torch.tensor([[1, 2, 3, 4] * 5, [1, 2, 3, 4] * 5])
    assert distinct_ngram_ratio(varied, 2) == 1.0
    # 2 windows x 17 four-grams, of which only 4 distinct (the loop's rotations)
    assert distinct_ngram_ratio(looping, 4) == 4 / 34
    assert distinct_ngram_ratio(looping, 1) == 4 / 40


def test_self_generation_writes_no_control_tokens(tiny_models):
    """Sampled text never holds the tokenizer's special tokens (a random tiny model would sample
    them: 3 of its 384 tokens), and prompts get the BOS when the tokenizer adds one."""
    from mi_prun.calibration import self_generated_ids, special_token_ids
    from mi_prun.load import load_model

    loaded = load_model(str(tiny_models["llama"]))
    special = set(special_token_ids(loaded.tokenizer))
    assert special >= {loaded.tokenizer.eos_token_id, loaded.tokenizer.bos_token_id}
    ids = self_generated_ids(loaded.model, loaded.tokenizer, CalibrationSpec("self", n_samples=8, seq_len=96, seed=1))
    # (the prompts themselves may hold <unk> for this tiny vocabulary: only the sampled part is checked)
    assert not special & set(ids[:, 48:].flatten().tolist())
    tokenizer = loaded.tokenizer
    adds_bos = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    assert (ids[:, 0] == tokenizer.bos_token_id).all() == adds_bos


def test_self_generated_window_depends_on_seed_and_index_only(tiny_models):
    """Window i is sampled with its own seed: written in one batch or split in two (as two ranks
    split it), the windows are the same; another --seed writes other text."""
    from mi_prun.calibration import self_generated_ids
    from mi_prun.load import load_model

    loaded = load_model(str(tiny_models["llama"]))
    spec = CalibrationSpec("self", n_samples=6, seq_len=32, seed=5)
    whole = self_generated_ids(loaded.model, loaded.tokenizer, spec)
    parts = torch.cat([self_generated_ids(loaded.model, loaded.tokenizer, spec, range(0, 2)),
                       self_generated_ids(loaded.model, loaded.tokenizer, spec, range(2, 6))])
    assert whole.shape == (6, 32)
    assert torch.equal(whole, parts)
    other = self_generated_ids(loaded.model, loaded.tokenizer, CalibrationSpec("self", n_samples=6, seq_len=32, seed=6))
    assert not torch.equal(whole, other)
