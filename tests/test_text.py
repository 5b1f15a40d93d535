"""The text task: corpora from files (tokenised and cached, or token arrays memory-mapped), its windows and
split, the bad-file table, Olsson's ICL score, and a short training run on a small corpus."""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lab
from lab import cli
from lab.errors import ConfigError
from lab.tasks import make_task
from lab.tasks.corpus import open_corpus
from lab.tasks.text import TextConfig, TextTask, icl_score, position_points
from lab.tracking import read_metrics
from tests.conftest import kill_once_checkpointed, lab_cmd

POSITIONS = 3000  # a token array whose ids are their own positions: every window says where it came from


@pytest.fixture
def positions(tmp_path) -> Path:
    path = tmp_path / "positions.npy"
    np.save(path, np.arange(POSITIONS, dtype=np.int32))
    return path


def _text_corpus(folder: Path, files: int = 3, size: int = 4000) -> Path:
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "(", ")", ":"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = " ".join(rng.choice(words, size // 5))
        (folder / f"part{i}.txt").write_text(text[:size] + "\n")
    return folder


def test_training_windows_are_contiguous_slices_of_the_training_split_and_a_pure_function_of_the_key(positions):
    task = make_task({"name": "text", "path": str(positions), "seq_len": 16, "eval_size": 50,
                      "heldout_fraction": 0.1})
    assert (task.n_train, task.n_heldout, task.vocab_size) == (2700, 300, POSITIONS)
    sample = jax.jit(lambda k: task.sample(k, 256))
    b = sample(jax.random.PRNGKey(3))
    tok, tgt = np.asarray(b["tokens"]), np.asarray(b["targets"])
    assert tok.shape == (256, 16) and np.array_equal(tgt, tok + 1)  # next token = next position
    assert np.all(np.diff(tok, axis=1) == 1)
    assert tok.min() >= 0 and tgt.max() <= task.n_train - 1  # never reads into the held-out split
    assert len(np.unique(tok[:, 0])) > 200  # the starts vary
    assert np.array_equal(np.asarray(sample(jax.random.PRNGKey(3))["tokens"]), tok)  # pure in the key
    assert not np.array_equal(np.asarray(sample(jax.random.PRNGKey(4))["tokens"]), tok)
    # R runs (the vmap of a batch of seeds) draw what each run draws alone
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    together = jax.jit(jax.vmap(lambda k: task.sample(k, 8)))(keys)["tokens"]
    alone = jax.jit(lambda k: task.sample(k, 8))
    for r in range(3):
        assert np.array_equal(np.asarray(together[r]), np.asarray(alone(keys[r])["tokens"]))
    # the held-out windows are fixed and lie in the held-out split alone
    held = np.asarray(task.evals["heldout"]["tokens"])
    assert held.shape == (50, 16) and held.min() >= task.n_train and np.all(np.diff(held, axis=1) == 1)
    again = make_task({"name": "text", "path": str(positions), "seq_len": 16, "eval_size": 50, "heldout_fraction": 0.1})
    assert np.array_equal(held, np.asarray(again.evals["heldout"]["tokens"]))


def test_the_repeat_probe_copies_a_segment_of_frequent_tokens_and_masks_its_second_copy(tmp_path):
    task = make_task({"name": "text", "path": str(_text_corpus(tmp_path / "c")), "seq_len": 16, "eval_size": 40,
                      "probe_tokens": 18, "cache_dir": str(tmp_path / "cache")})
    rep = {k: np.asarray(v) if not isinstance(v, dict) else {m: np.asarray(x) for m, x in v.items()}
           for k, v in task.evals["repeat"].items()}
    assert set(np.unique(rep["tokens"])) <= set(task.probe_ids.tolist()) and len(task.probe_ids) == 18
    assert bytes(task.probe_ids.astype(np.uint8)).strip()  # the corpus's own bytes: letters, spaces
    rows, cols = np.nonzero(rep["masks"]["repeated"])
    assert len(rows) > 0
    for r, c in zip(rows, cols, strict=True):  # the target at a repeated position is the token after its earlier copy
        earlier = np.nonzero(rep["tokens"][r, :c] == rep["tokens"][r, c])[0]
        assert len(earlier) == 1 and rep["tokens"][r, earlier[0] + 1] == rep["targets"][r, c]


def test_text_is_tokenised_once_and_cached_by_content_and_settings(tmp_path):
    folder = _text_corpus(tmp_path / "corpus", files=2, size=500)
    (folder / "binary.dat").write_bytes(b"\x00\x01\x02")  # a binary file in the folder is skipped
    a = open_corpus(str(folder))
    cache = Path(a.info["cache"])
    assert cache.parent == tmp_path / "corpus.tokens" and a.info["files"] == 2
    expected = b"".join(f.read_bytes() + b"\0" for f in sorted(folder.glob("part*.txt")))
    assert bytes(np.asarray(a.tokens).astype(np.uint8)) == expected and a.vocab_size == 256
    assert isinstance(a.tokens, np.memmap)
    stamp = cache.stat().st_mtime_ns
    b = open_corpus(str(folder))
    assert b.info["key"] == a.info["key"] and cache.stat().st_mtime_ns == stamp  # read from the cache
    (folder / "part1.txt").write_text("changed\n")  # an edited file: another key, tokenised afresh
    c = open_corpus(str(folder))
    assert c.info["key"] != a.info["key"] and bytes(np.asarray(c.tokens[-9:]).astype(np.uint8)) == b"changed\n\0"
    # a BPE trained on the corpus: another key; its saved tokenizer encodes another corpus with the same ids
    bpe = open_corpus(str(folder), tokenizer="bpe", bpe_vocab=270)
    assert bpe.info["key"] != c.info["key"] and bpe.vocab_size == 270 and int(np.max(bpe.tokens)) < 270
    other = open_corpus(str(_text_corpus(tmp_path / "other", files=1, size=300)), tokenizer=bpe.info["tokenizer_file"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(bpe.info["tokenizer_file"])
    text = (tmp_path / "other" / "part0.txt").read_text()
    assert tok.decode(np.asarray(other.tokens[:-1]).tolist()) == text


def test_a_nanogpt_bin_array_is_memory_mapped_with_its_dtype(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    c = open_corpus(str(path))
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint16 and c.vocab_size == 500
    assert open_corpus(str(path), vocab_size=1000).vocab_size == 1000
    c32 = open_corpus(str(path), dtype="uint32")
    assert len(c32.tokens) == 250


def _write(tmp_path, name, kind):
    p = tmp_path / name
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "short":
        np.save(p, np.arange(10, dtype=np.int32))
    elif kind == "float":
        np.save(p, np.linspace(0, 1, 100))
    elif kind == "2d":
        np.save(p, np.zeros((10, 10), np.int32))
    elif kind == "big_id":
        np.save(p, np.array([1, 2, 70000] * 100, np.int32))
    elif kind == "negative":
        np.save(p, np.array([1, -2, 3] * 100, np.int32))
    elif kind == "odd_bin":
        p.write_bytes(b"\x01\x00\x02")
    elif kind == "not_npy":
        p.write_bytes(b"hello, not an array")
    elif kind == "binary_text":
        p.write_bytes(b"\x00\x01\x02text")
    elif kind == "empty_folder":
        p.mkdir()
    return p


BAD_FILES = [  # (file, how it is made, extra config, the field named, what the line says)
    ("missing.txt", None, {}, "task.path", "no such file or folder"),
    ("missing.npy", None, {}, "task.path", "no such file"),
    ("empty.txt", "empty", {}, "task.path", "the file is empty"),
    ("empty.bin", "empty", {}, "task.path", "the file is empty"),
    ("short.npy", "short", {}, "task.path", "shorter than one window"),
    ("float.npy", "float", {}, "task.path", "token ids must be integers"),
    ("matrix.npy", "2d", {}, "task.path", "must have one dimension"),
    ("big.npy", "big_id", {"vocab_size": 1000}, "task.path", "token id 70000, beyond task.vocab_size=1000"),
    ("negative.npy", "negative", {}, "task.path", "must be >= 0"),
    ("odd.bin", "odd_bin", {}, "task.path", "not a whole number of task.dtype=uint16 tokens"),
    ("fake.npy", "not_npy", {}, "task.path", "not a readable .npy array"),
    ("blob.txt", "binary_text", {}, "task.path", "not a text file"),
    ("nothing", "empty_folder", {}, "task.path", "no non-empty text files"),
    ("float.bin", "odd_bin", {"dtype": "float32"}, "task.dtype", "an integer dtype"),
]


@pytest.mark.parametrize("name,kind,extra,field,says", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_corpus_is_refused_in_one_line_naming_the_field(tmp_path, name, kind, extra, field, says):
    path = _write(tmp_path, name, kind) if kind else tmp_path / name
    with pytest.raises(ConfigError) as e:
        make_task({"name": "text", "path": str(path), "seq_len": 16, "cache_dir": str(tmp_path / "cache"), **extra})
    assert e.value.field == field and says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_bad_corpus_exits_2_with_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    p = subprocess.run(lab_cmd("train", "experiment=olsson_text", f"task.path={tmp_path / 'none.bin'}",
                               f"run.dir={run}", "tracking.wandb.mode=disabled"), capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("error: task.path=") and "no such file" in p.stderr
    assert not run.exists()


def test_icl_score_is_the_late_loss_minus_the_early_loss_on_a_hand_built_case():
    # vocabulary 4, 2 sequences of 8 positions; the target is always 0 and the logits give it probability p_t
    T, V = 8, 4
    p = np.full(T, 0.25)
    p[1], p[6] = 0.5, 0.9  # early = 1, late = 6
    logits = np.log(np.stack([p, *[(1 - p) / 3] * 3], axis=-1))  # [T, V]: softmax gives back p at id 0
    batch = {"tokens": jnp.zeros((2, T), jnp.int32), "targets": jnp.zeros((2, T), jnp.int32),
             "loss_mask": jnp.ones((2, T)), "masks": {}}
    task = TextTask.__new__(TextTask)
    task.cfg, task.seq_len = TextConfig(seq_len=T, icl_early=1, icl_late=6), T
    out = task.metrics(jnp.asarray(np.broadcast_to(logits, (2, T, V))), batch)
    assert float(out["icl_score"]) == pytest.approx(np.log(0.5) - np.log(0.9), abs=1e-5)  # -ln 0.9 - (-ln 0.5)
    assert float(out["loss_pos0"]) == pytest.approx(np.log(4), abs=1e-5)
    assert float(out["loss_pos7"]) == pytest.approx(np.log(4), abs=1e-5)
    assert position_points(8) == [0, 1, 3, 7] and position_points(64)[-2:] == [31, 63]
    nll = jnp.asarray([[3.0, 1.0], [1.0, 0.0]])
    assert float(icl_score(nll, 0, 1)) == pytest.approx(0.5 - 2.0)
    # Olsson's positions (the 50th and 500th token of 512) scaled to the context
    assert TextConfig(seq_len=512).positions() == (49, 499) and TextConfig(seq_len=64).positions() == (5, 61)


SMALL = ["experiment=olsson_text", "task.tokenizer=byte", "tracking.wandb.mode=disabled", "trainer.progress=false",
         "trainer.steps=40", "trainer.steps_per_call=10", "trainer.eval_every=20", "trainer.eval_log_points=0",
         "checkpoint.every=20", "checkpoint.log_points=0", "task.seq_len=16", "task.eval_size=32", "model.d_model=16",
         "model.n_heads=2", "trainer.batch_size=8", "measures.names=[prev_token,prefix_matching,copying]"]


def test_a_short_run_on_a_small_corpus_logs_olssons_measures_and_replays_on_another(tmp_path):
    corpus = _text_corpus(tmp_path / "corpus")
    run = lab.train(*SMALL, f"task.path={corpus}", f"run.dir={tmp_path / 'run'}")
    rows = read_metrics(run.dir / "metrics.jsonl")
    last = rows[-1]
    for key in ("heldout/loss", "heldout/icl_score", "heldout/loss_pos0", "heldout/loss_pos15", "repeat/repeated_loss",
                "prefix_matching/L1H0", "prev_token/L0H1", "copying/L1H0"):
        assert key in last and np.isfinite(last[key]), key
    assert last["heldout/loss"] < rows[0]["heldout/loss"]  # it learns the corpus
    s = json.loads((run.dir / "summary.json").read_text())
    assert s["circuit"]["is_induction_circuit"] in (True, False) and s["data"]["files"] == 3
    assert s["data"]["tokens"] == sum(len(f.read_bytes()) + 1 for f in corpus.glob("*.txt"))
    # curves.png gives the watched ICL score (neither a loss nor an accuracy) a third panel of its own
    import matplotlib.image

    assert matplotlib.image.imread(run.dir / "curves.png").shape[1] == 3 * 6 * 110
    # replay the trained model on another corpus: the held-out split of that one
    other = _text_corpus(tmp_path / "other", files=2, size=3000)
    assert cli.main(["replay", str(run.dir), f"task.path={other}", "--quiet"]) == 0


@pytest.mark.slow  # a text run killed with SIGKILL mid-run, then resumed: ~40 s
def test_a_text_run_killed_with_sigkill_resumes_to_the_uninterrupted_run(tmp_path):
    corpus = _text_corpus(tmp_path / "corpus")
    ov = [*SMALL, f"task.path={corpus}", "trainer.steps=200", "trainer.steps_per_call=5", "checkpoint.every=20"]
    ref = lab.train(*ov, f"run.dir={tmp_path / 'ref'}")
    victim = tmp_path / "victim"
    kill_once_checkpointed(["train", *ov, f"run.dir={victim}", "--quiet"], victim, 60)
    done = subprocess.run(lab_cmd("resume", str(victim), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(victim / "metrics.jsonl")) == strip(read_metrics(ref.dir / "metrics.jsonl"))
