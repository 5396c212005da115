"""The training loop in-process: end to end on token ids, the schedule, packing, accumulation,
bad input, and `openk2 plot`. (Kills, resume after a kill and torchrun: test_train_resume.py.)"""

import json
import math
import os

import numpy as np
import pytest
import torch

from openk2 import cli
from openk2 import train as T
from openk2.checkpoint import load_model
from openk2.data import (IGNORE, DataError, PackedConversations, TokenStream, markov_tokens,
                         open_data, write_tokens)
from openk2.model import document_mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
    threads wait on each other (several times slower): these tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bin_file(tmp_path_factory):
    ids, _ = markov_tokens(20000, 512, seed=0, order=1)
    return write_tokens(tmp_path_factory.mktemp("data") / "tokens.bin", ids)


def opts(out, data, **kw):
    base = dict(out=str(out), data=str(data), preset="k2-tiny", seq_len=32, batch_size=4, steps=6,
                save_every=3, quiet=True, lr=3e-3)
    base.update(kw)
    return T.TrainOptions(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in open(f"{out}/metrics.jsonl")]


# ---- end to end ------------------------------------------------------------------------------

def test_train_on_token_ids_end_to_end(tmp_path, bin_file):
    """`openk2 train` through the CLI parser on a .bin: the loss falls, metrics carry every field,
    checkpoints load as models, and `latest` points at the final one."""
    ids = np.arange(20000) % 23  # a pattern a tiny model learns in a few steps
    data = write_tokens(tmp_path / "cyc.bin", ids)
    out = tmp_path / "run"
    rc = cli.main(["train", "--preset", "k2-tiny", "--data", str(data), "--seq-len", "32", "--batch-size", "4",
                   "--steps", "25", "--save-every", "10", "--out", str(out), "--quiet", "--lr", "1e-2"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 26))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "max_logit", "qk_clipped_heads",
                "expert_load_cv", "expert_load", "elapsed_s", "grad_norm"):
        assert key in rows[-1], key
    assert rows[-1]["tokens"] == 25 * 4 * 32
    assert len(rows[-1]["expert_load"]) == 2 and sum(rows[-1]["expert_load"][0]) == 4 * 32 * 2  # top-2
    # per-head maxima (what QK-Clip compares with tau): one list per layer, their maxima the per-layer ones
    heads = rows[-1]["max_logit_heads"]
    assert [len(h) for h in heads] == [4, 4, 4]
    assert [max(h) for h in heads] == pytest.approx(rows[-1]["max_logit_layers"])
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    ckpts = T.find_checkpoints(out)
    assert [c.name for c in ckpts] == ["step-0000020", "step-0000025"]  # --keep 2 default
    assert (out / "latest").resolve() == ckpts[-1].resolve()
    model = load_model(out / "latest")
    assert model.config.hidden_size == 64
    # the router bias moved (and is saved): it is a persistent, trained-by-rule buffer
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(out), str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_schedule_is_warmup_stable_decay():
    f = [T.lr_factor(s, 100, 10, 0.2, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:9], f[1:10]))
    assert set(f[10:80]) == {1.0}
    assert all(b < a for a, b in zip(f[80:], f[81:]))
    assert f[-1] == pytest.approx(0.1)
    assert f[90] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 11 / 20)))


def test_training_runs_with_denormals_flushed_and_restores_the_mode(tmp_path, bin_file, monkeypatch):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []
    monkeypatch.setattr(T, "_train", lambda o, d: seen.append(T.denormals_flushed()) or {})
    T.train(opts(tmp_path / "a", bin_file))
    assert seen == [True] and not T.denormals_flushed()
    with pytest.raises(RuntimeError):  # restored on the way out of an error too
        with T.flush_denormals(torch.device("cpu")):
            assert T.denormals_flushed()
            raise RuntimeError
    assert not T.denormals_flushed()
    with T.flush_denormals(torch.device("meta")):  # another device: untouched
        assert not T.denormals_flushed()
    torch.set_flush_denormal(True)  # a caller that flushes already keeps flushing after
    try:
        with T.flush_denormals(torch.device("cpu")):
            pass
        assert T.denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, bin_file):
    T.train(opts(tmp_path / "a", bin_file, steps=4, save_every=10))
    T.train(opts(tmp_path / "b", bin_file, steps=4, save_every=10, micro_batch=1))
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-5)


def interrupted_run(monkeypatch, o, at_call=5):
    """Train with a Ctrl-C raised in the `at_call`-th forward's loss (one micro-batch per step)."""
    real, calls = torch.nn.functional.cross_entropy, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(o)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)


def test_resume_in_process_is_bit_identical(tmp_path, bin_file, monkeypatch):
    T.train(opts(tmp_path / "full", bin_file, steps=8, save_every=3))
    interrupted_run(monkeypatch, opts(tmp_path / "cut", bin_file, steps=8, save_every=3))  # in step 5
    assert len(losses(tmp_path / "cut")) == 4
    T.train(T.TrainOptions(out=str(tmp_path / "cut"), resume=True, quiet=True))  # options from the run
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    a, b = load_model(tmp_path / "full" / "latest"), load_model(tmp_path / "cut" / "latest")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, bin_file, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = tmp_path / "run"
    with pytest.raises(T.TrainingError, match=r"step 5: loss is nan.*step-0000004"):
        T.train(opts(out, bin_file, steps=8, save_every=2))
    assert T.latest_checkpoint(out).name == "step-0000004"
    load_model(T.latest_checkpoint(out))
    assert len(losses(out)) == 4


# ---- packing conversations ----------------------------------------------------------------------

def test_packed_conversations_equal_separate_forwards():
    rng = np.random.default_rng(0)
    convs = []
    for n in (9, 14, 5, 20, 7, 11):
        ids = rng.integers(0, 500, n)
        mask = (rng.random(n) < 0.6).astype(np.int64)
        convs.append((ids, mask))
    data = PackedConversations(convs, seq_len=24, vocab_size=512, pad_id=511, seed=3)
    assert "6 conversations" in data.describe()
    b = data.batch(0, 3)
    torch.manual_seed(0)
    model = load_model("k2-tiny").train()
    attn = model.model.layers[0].self_attn
    attn.max_logit.zero_()
    packed = model(b.inputs, positions=b.positions, attn_mask=document_mask(b.doc_ids))
    assert attn.max_logit.abs().sum() > 0  # the training path (naive MLA) ran and fed QK-Clip
    mask_logit = attn.max_logit.clone()
    seen = 0
    for r in range(3):
        for d in sorted(set(b.doc_ids[r].tolist()) - {-1}):
            cols = (b.doc_ids[r] == d).nonzero().flatten()
            alone = model(b.inputs[r:r + 1, cols])
            torch.testing.assert_close(packed[r:r + 1, cols], alone, rtol=1e-4, atol=1e-5)
            conv = next(c for c in convs if len(c[0]) >= len(cols) and np.array_equal(c[0][:len(cols)],
                                                                                     b.inputs[r, cols].numpy()))
            # targets: the conversation's next tokens where its mask is 1, nothing across the boundary
            tgt = b.targets[r, cols].numpy()
            for j in range(len(cols)):
                nxt = j + 1
                if nxt < len(conv[0]) and conv[1][nxt] and (j + 1 < len(cols)):
                    assert tgt[j] == conv[0][nxt]
                else:
                    assert tgt[j] == IGNORE
            seen += 1
    assert seen >= 5  # (a conversation may be at the tail of a later row)
    # the training path: doc_ids (attention per conversation) is the same function as the dense mask,
    # QK-Clip's max logit and the gradients included
    grads = []
    for kw in ({"attn_mask": document_mask(b.doc_ids)}, {"doc_ids": b.doc_ids}):
        model.zero_grad()
        out = model(b.inputs, positions=b.positions, **kw)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(out, packed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.max_logit, mask_logit)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not one contiguous run"):
        model(b.inputs[:1], doc_ids=torch.tensor([[0] * 5 + [1] * 5 + [0] * 14]))


def test_token_stream_visits_every_window_once_per_epoch(bin_file):
    ts = TokenStream(bin_file, 32, 512, seed=1)
    first = ts.batch(0, ts.n_windows).inputs
    assert len({tuple(r.tolist()) for r in first}) == ts.n_windows
    again = TokenStream(bin_file, 32, 512, seed=1).batch(5, 3)
    assert torch.equal(again.inputs, first[5:8])


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_token_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        open_data(str(tmp_path / "missing.bin"), 32, 512)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="odd.bin: 10 bytes is not a whole number"):
        open_data(str(odd), 32, 512)
    short = write_tokens(tmp_path / "short.bin", [1, 2, 3])
    with pytest.raises(DataError, match="fewer than one sequence"):
        open_data(str(short), 32, 512)
    big = write_tokens(tmp_path / "big.bin", [1] * 100 + [9999] + [2] * 100)
    with pytest.raises(DataError, match="token id 9999 at index 100 is outside"):
        open_data(str(big), 32, 512)
    with pytest.raises(DataError, match="expected gym:FAMILY"):
        open_data(str(tmp_path / "x.txt"), 32, 512)


def test_bad_jsonl_names_file_and_lines(tmp_path):
    f = tmp_path / "convs.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps(good), json.dumps({"messages": []}),
                            json.dumps([1, 2]), ""]) + "\n")
    with pytest.raises(DataError) as e:
        open_data(str(f), 32, 512)
    msg = str(e.value)
    assert f"{f}:2: not valid JSON" in msg and f"{f}:4: \"messages\" must be" in msg
    assert f"{f}:5: expected a JSON object" in msg and f"{f}:1" not in msg
    # a line that parses but does not render (the renderer's message, with the line)
    tok = pytest.importorskip("openk2.tokenizer").tiny_tokenizer()
    f.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                                                    {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=f"{f}:2: cannot render this conversation .*wizard"):
        open_data(str(f), 32, 512, tokenizer=tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no conversations"):
        open_data(str(empty), 32, 512)


def test_train_on_gym_data(tmp_path):
    gym = pytest.importorskip("openk2.gym")
    tok = pytest.importorskip("openk2.tokenizer").tiny_tokenizer()
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    with pytest.raises(DataError, match="--data gym:nope: unknown gym family"):
        open_data("gym:nope", 32, 512, tokenizer=tok)
    src = open_data("gym:arith", 512, 512, tokenizer=tok, gym_size=6)
    from openk2.chat import render_ids
    first = next(gym.conversations("arith", seed=0, split="train", n=1))
    ids, mask = render_ids(first["messages"], first["tools"], tok)
    assert np.array_equal(src.convs[0][0], np.asarray(ids[:513])) and "6 conversations" in src.describe()
    T.train(T.TrainOptions(out=str(tmp_path / "run"), data="gym:arith", gym_size=6, tokenizer=str(tok_dir),
                           preset="k2-tiny", seq_len=512, batch_size=2, steps=2, quiet=True))
    assert len(losses(tmp_path / "run")) == 2


def test_qat_without_the_int4_module_is_a_clear_error(tmp_path, bin_file):
    try:
        from openk2.quant import enable_qat  # noqa: F401
        pytest.skip("openk2.quant.enable_qat exists")
    except ImportError:
        pass
    with pytest.raises(T.TrainingError, match="--qat experts needs openk2.quant"):
        T.train(opts(tmp_path / "q", bin_file, qat="experts"))


def test_qat_trains_on_int4_values_and_resumes_exactly(tmp_path, bin_file, monkeypatch):
    quant = pytest.importorskip("openk2.quant")
    if not hasattr(quant, "enable_qat"):
        pytest.skip("no openk2.quant.enable_qat")
    T.train(opts(tmp_path / "plain", bin_file, steps=1))
    T.train(opts(tmp_path / "full", bin_file, steps=6, qat="experts"))
    assert losses(tmp_path / "full")[0] != losses(tmp_path / "plain")[0]  # the forward saw INT4 experts
    interrupted_run(monkeypatch, opts(tmp_path / "cut", bin_file, steps=6, qat="experts"))
    T.train(T.TrainOptions(out=str(tmp_path / "cut"), resume=True, quiet=True))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    # checkpoints hold the latent float weights (what resuming needs), not the packed INT4 export
    assert "quantization_config" not in json.loads((tmp_path / "full" / "latest" / "config.json").read_text())


def test_existing_run_resume_options_and_foreign_checkpoints(tmp_path, bin_file):
    out = tmp_path / "run"
    T.train(opts(out, bin_file, steps=3, save_every=3))
    with pytest.raises(T.TrainingError, match="already holds a run.*--resume"):
        T.train(opts(out, bin_file, steps=6))
    with pytest.raises(T.TrainingError, match=r"--lr 0.1 \(the run used 0.003\)"):
        T.train(opts(out, bin_file, steps=6, lr=0.1, resume=True))
    with pytest.raises(T.TrainingError, match="--preset k2-nano"):
        T.train(opts(tmp_path / "sft", bin_file, preset="k2-nano", init=str(out / "latest")))
    # --init continues from the weights with a fresh optimizer: the first loss equals the
    # pretraining run's loss on the same batch under the final weights
    T.train(opts(tmp_path / "sft", bin_file, preset=None, init=str(out / "latest"), steps=1, save_every=1))
    assert losses(tmp_path / "sft")[0] < losses(out)[0]
    cfg = tmp_path / "config.json"
    load_model(out / "latest").config.save(cfg)
    T.train(opts(tmp_path / "fromcfg", bin_file, preset=None, config=str(cfg), steps=1))
    assert losses(tmp_path / "fromcfg")[0] == losses(out)[0]  # same config + seed = same init
    with pytest.raises(T.TrainingError, match="--micro-batch 3 does not divide"):
        T.train(opts(tmp_path / "mb", bin_file, micro_batch=3))


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = cli.main(["train", "--preset", "k2-tiny", "--data", str(tmp_path / "none.bin"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "none.bin: no such data file" in err and "Traceback" not in err
    rc = cli.main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.png")])
    assert rc == 2 and "no metrics.jsonl" in capsys.readouterr().err


# ---- conversations (JSONL through openk2.chat.render_ids) ----------------------------------------

CALC = {"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                         "parameters": {"type": "object",
                                                        "properties": {"expression": {"type": "string"}}}}}


def conversation(i):
    a, b = i % 7, i % 5
    if i % 2:
        return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                             {"role": "assistant", "content": f"{a + b}"}]}
    call = {"id": "functions.calculator:0", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": f"{a}+{b}"}}}
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "reasoning_content": "add them", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "functions.calculator:0", "content": str(a + b)},
                         {"role": "assistant", "content": f"{a + b}"}],
            "tools": [CALC]}


def test_train_on_jsonl_conversations_end_to_end(tmp_path):
    tokenizer = pytest.importorskip("openk2.tokenizer")
    from openk2.chat import render_ids
    tok = tokenizer.tiny_tokenizer()
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    data = tmp_path / "convs.jsonl"
    convs = [conversation(i) for i in range(24)]
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    out = tmp_path / "sft"
    rc = cli.main(["train", "--preset", "k2-tiny", "--data", str(data), "--tokenizer", str(tok_dir),
                   "--seq-len", "256", "--batch-size", "4", "--steps", "20", "--save-every", "20", "--lr", "1e-2",
                   "--out", str(out), "--quiet"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    # only the assistant's own tokens count: far fewer than the rows' tokens
    assert all(0 < r["loss_tokens"] < 4 * 256 // 2 for r in rows)
    ck = T.latest_checkpoint(out)
    assert tokenizer.load_tokenizer(ck).vocab_size == tok.vocab_size  # the checkpoint carries its tokenizer
    # one epoch of packed rows trains on exactly the tokens render_ids marks
    src = open_data(str(data), 256, 512, tokenizer=tok)
    n_rows = len(src._rows_of(0))
    trained = src.batch(0, n_rows).n_loss_tokens
    assert trained == sum(sum(render_ids(c["messages"], c.get("tools"), tok)[1]) for c in convs)
    # an SFT run from the pretrained checkpoint picks the tokenizer up from it
    T.train(T.TrainOptions(out=str(tmp_path / "sft2"), data=str(data), init=str(ck), seq_len=256, batch_size=4,
                           steps=1, quiet=True))


def test_flushing_reaches_every_intra_op_thread_when_entered_first(tmp_path):
    """torch sets the mode per thread and the OpenMP workers keep the one they were created with, so
    flush_denormals must be entered before the first parallel op, as train() and rl() do in a fresh
    `openk2 train` / `openk2 rl` process. A big elementwise op runs on every worker: with all of them
    flushing, denormal inputs give exact zeros everywhere."""
    import subprocess
    import sys
    import textwrap
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    probe = textwrap.dedent("""
        import sys, numpy, torch
        import openk2.cli, openk2.rl, openk2.train as T
        torch.set_num_threads(2)
        x = torch.from_numpy(numpy.full(4_000_000, 4e-39, dtype=numpy.float32))   # denormals, no torch op yet
        if sys.argv[1] == "late":
            torch.zeros(4_000_000).add_(1)       # a parallel op first: the workers exist, unflushed
        with T.flush_denormals(torch.device("cpu")):
            print(int(((x * 1.0) != 0).sum()))  # denormals that survived the multiply
    """)
    def survivors(order):
        return int(subprocess.run([sys.executable, "-c", probe, order], capture_output=True, text=True,
                                  check=True, env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.strip())
    assert survivors("first") == 0
    if (os.cpu_count() or 1) > 1:   # the trap the first bench fell into: entered late, a worker keeps denormals
        assert survivors("late") > 0


def test_heldout_loss_is_the_mean_ce_on_the_generated_tokens_only(tmp_path, capsys):
    """A model whose logits are all zero has CE ln(V) on every token: the mean is that, and the count
    is the number of masked (model-generated) target tokens, not all of them. `openk2 loss` says the
    same; a file that is not conversations is a one-line error."""
    from openk2 import save_model
    from openk2.chat import render_ids
    from openk2.gym import conversations
    from openk2.tokenizer import tiny_tokenizer

    model = load_model("k2-tiny")
    torch.nn.init.zeros_(model.lm_head.weight)
    save_model(model, tmp_path / "m")
    tok = tiny_tokenizer()
    tok.save(tmp_path / "m")
    records = list(conversations("arith", seed=98, difficulty="arith=1", n=2, context_window=None))
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    loss, n = T.heldout_loss(tmp_path / "m", data, max_len=1500)
    masks = [render_ids(r["messages"], r["tools"], tok)[1][:1500] for r in records]
    assert n == sum(sum(m[1:]) for m in masks) and 0 < n < sum(len(m) - 1 for m in masks)
    assert loss == pytest.approx(math.log(model.config.vocab_size), rel=1e-5)
    cut = min(m.index(1) for m in masks) + 20                  # cut inside the first answer: fewer tokens
    assert 0 < T.heldout_loss(tmp_path / "m", data, max_len=cut)[1] < n
    with pytest.raises(DataError, match="no generated"):
        T.heldout_loss(tmp_path / "m", data, max_len=5)
    assert cli.main(["loss", str(tmp_path / "m"), "--data", str(data), "--max-len", "1500",
                     "--json", str(tmp_path / "l.json")]) == 0
    got = json.loads((tmp_path / "l.json").read_text())["results"]
    assert got[0]["tokens"] == n and got[0]["loss"] == pytest.approx(loss)
    data.write_text("not json\n")
    assert cli.main(["loss", str(tmp_path / "m"), "--data", str(data)]) != 0
    assert "Traceback" not in capsys.readouterr().err
