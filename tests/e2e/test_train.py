"""The reference trainer (shardshap/recipe, launch/train.py): every file in configs/ loads and builds; bad
configs fail naming the key; attribution does not change training; a resumed run's store equals an
uninterrupted one; and the quickstart pipeline end to end on 2 DeepSpeed ZeRO-2 ranks (train -> report ->
plot -> select -> retrain on the selection)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shardshap.config import ConfigError
from shardshap.recipe.config import load_config, validate
from shardshap.recipe.model import build_model, count_parameters
from shardshap.store import open_scores

ROOT = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)


def demo_corpus(out, per_domain, val=4):
    spec = importlib.util.spec_from_file_location("demo_corpus", ROOT / "launch" / "demo_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_demo_corpus(str(out), per_domain=per_domain, val=val)


def tiny(tmp_path, **train):
    """A small single-process config on a reduced demo corpus (as a dict)."""
    p = demo_corpus(tmp_path / "data", per_domain=16)
    return {"out_dir": str(tmp_path / "run"),
            "model": {"family": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2},
            "data": {"corpus": [p["train"]], "seq_len": 32, "truncate": True,
                     "validation": {"code": p["val_code"], "prose": p["val_prose"]}, "val_sequences": 4},
            "train": {"steps": 6, "micro_batch": 4, "grad_accum": 2, "lr": 3e-3, "warmup": 2,
                      "max_grad_norm": 0.5, "seed": 1, **train},
            "attribution": {"overwrite": True}}


# ------------------------------------------------------------------ configs
EXPECTED_PARAMS = {  # published sizes: GPT-2 small 124,439,808; Llama-3.2-1B 1,235,814,400
    "gpt2_small_zero2.yaml": 124_439_808,
    "llama_fsdp2.yaml": 1_235_814_400,
    "demo_cpu.yaml": None,
}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").iterdir()))
def test_every_config_file_is_valid(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in configs are relative to the repository root
    path = ROOT / "configs" / name
    if name.endswith(".json"):  # a DeepSpeed config: plugged into the demo config it must validate
        ds = json.loads(path.read_text())
        assert ds["zero_optimization"]["stage"] == int(name[len("ds_zero")])
        cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", [f"distributed.deepspeed=configs/{name}"])
        assert cfg.distributed.deepspeed == f"configs/{name}"
        return
    assert name in EXPECTED_PARAMS, f"add {name} to EXPECTED_PARAMS"
    cfg = load_config(path)
    vocab = 257  # the byte tokenizer (all configs use it)
    model = build_model(cfg, vocab, 256, device="meta")
    n = count_parameters(model)
    if EXPECTED_PARAMS[name]:
        assert n == EXPECTED_PARAMS[name]
    else:  # the demo: 2 layers, d=64, 257 tokens, 64 positions, tied head
        d, L, V, T = 64, 2, 257, 64
        assert n == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize("override, key", [
    ("train.stpes=5", "train.stpes"),                 # unknown key
    ("train.lr=-1", "train.lr"),                      # bad value
    ("data.packing=zip", "data.packing"),
    ("model.family=bert", "model.family"),
    ("distributed.engine=horovod", "distributed.engine"),
    ("attribution.estimatr=secant", "estimatr"),     # shardshap.Config field
    ("attribution.order=3", "order"),
    ("attribution.num_samples=5", "attribution.num_samples"),
    ("distributed.deepspeed={optimizer: {type: Adam}}", "optimizer"),
    ("distributed.deepspeed={gradient_accumulation_steps: 7}", "gradient_accumulation_steps"),
])
def test_bad_config_names_the_key(override, key, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo_cpu.yaml", [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg, msg
    if override.startswith("train.stpes"):
        assert "did you mean 'steps'" in msg


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("schedule,checkpointing", [("cached", "none"), ("streaming", "reentrant")])
def test_attribution_does_not_change_training(tmp_path, schedule, checkpointing):
    from shardshap.recipe.train import run
    d = tiny(tmp_path)
    d["model"]["activation_checkpointing"] = checkpointing
    d["attribution"]["schedule"] = schedule
    on = run(validate(d)).module.state_dict()
    d["attribution"]["enabled"] = False
    plain = run(validate(d)).module.state_dict()
    torch.manual_seed(d["train"]["seed"])  # the same init, untrained
    init = build_model(validate(d), 257, 256).state_dict()
    assert any(not torch.equal(init[k], plain[k]) for k in plain), "training did not move the parameters"
    for k in plain:
        assert torch.equal(on[k], plain[k]), k


def test_eval_every_logs_target_losses_and_leaves_training_alone(tmp_path):
    from shardshap.recipe.train import run
    d = tiny(tmp_path, eval_every=4)
    d["attribution"]["enabled"] = False
    d["model"]["dropout"] = 0.1  # the evaluation runs in eval mode and draws no random numbers
    res = run(validate(d))
    assert [e["step"] for e in res.summary["eval"]] == [4, 6]  # every 4 steps and after the last
    assert set(res.summary["eval"][0]) == {"step", "code", "prose"}
    logged = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert logged == res.summary["eval"]
    d["train"]["eval_every"] = 0
    ref = run(validate(d))
    assert "eval" not in ref.summary
    for k, v in ref.module.state_dict().items():
        assert torch.equal(res.module.state_dict()[k], v), k


def test_resumed_run_store_equals_uninterrupted(tmp_path):
    from shardshap.recipe.train import run
    d = tiny(tmp_path)
    d["out_dir"] = str(tmp_path / "a")
    ref = run(validate(d)).module.state_dict()
    a = open_scores(str(tmp_path / "a" / "run.zarr"))
    d["out_dir"] = str(tmp_path / "b")
    d["train"]["checkpoint"] = {"every": 3}
    run(validate(d), stop_after=5)  # preempted after step 5; the last checkpoint is at step 3
    d["train"]["resume"] = True
    res = run(validate(d))
    assert res.summary["resumed_at"] == 3
    b = open_scores(str(tmp_path / "b" / "run.zarr"))
    np.testing.assert_array_equal(b.count, a.count)
    assert a.count.sum() == 6 * 8  # 6 steps x 8 samples, each sample once per step
    np.testing.assert_allclose(b.value, a.value, rtol=1e-6, atol=1e-12)
    for k, v in res.module.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ------------------------------------------------------------------ 2 ranks end to end
def _torchrun(args, cwd, timeout=400):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", str(ROOT / "launch" / "train.py")]
    proc = subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _cli(*args, cwd):
    proc = subprocess.run([os.path.join(BIN, "shardshap"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.slow
def test_quickstart_pipeline_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    per_domain, steps, gb = 48, 12, 16  # 144 sequences; 4 per micro-batch x 2 micro-batches x 2 ranks
    p = demo_corpus(tmp_path / "data", per_domain)
    sets = ["--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.corpus=[{p['train']}]",
            "--set", f"data.validation.code={p['val_code']}", "--set", f"data.validation.prose={p['val_prose']}",
            "--set", f"train.steps={steps}", "--set", "train.micro_batch=4", "--set", "train.warmup=2"]
    _torchrun(["--config", str(ROOT / "configs" / "demo_cpu.yaml"), *sets], cwd=ROOT)
    store = str(tmp_path / "run" / "run.zarr")
    scores = open_scores(store)
    assert scores.count.sum() == steps * gb and len(scores.count) == 3 * per_domain
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["engine"] == "deepspeed"

    rep = json.loads(_cli("report", store, "--json", cwd=tmp_path))
    assert set(rep["per_domain"]) == {"code", "prose", "junk"}
    assert sum(x["samples"] for x in rep["per_domain"].values()) == int((scores.count > 0).sum())
    assert rep["targets"] == ["code", "prose"] and "auroc_low_value_is_junk" in rep

    pngs = json.loads(_cli("plot", store, "-o", str(tmp_path / "plots"), "--json", cwd=tmp_path))
    assert pngs
    import matplotlib.image
    for f in pngs:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(f)
        assert img.ndim == 3 and min(img.shape[:2]) > 50

    keep_file = tmp_path / "keep.txt"
    _cli("select", store, "--rule", "drop-lowest", "--fraction", "0.25", "-o", str(keep_file), cwd=tmp_path)
    keep = np.loadtxt(keep_file, dtype=np.int64)
    assert 0 < len(keep) < 3 * per_domain

    _torchrun(["--config", str(ROOT / "configs" / "demo_cpu.yaml"), *sets, "--set", f"out_dir={tmp_path / 'retrain'}",
               "--set", f"data.keep={keep_file}", "--set", "train.steps=4"], cwd=ROOT)
    again = open_scores(str(tmp_path / "retrain" / "run.zarr"))
    seen = np.flatnonzero(again.count > 0)
    assert again.count.sum() == 4 * gb
    assert np.isin(seen, keep).all(), f"the retrained run saw dropped ids {np.setdiff1d(seen, keep)[:5]}"


@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.slow
def test_bf16_under_deepspeed_matches_fp32(tmp_path):
    """DeepSpeed ZeRO-2 with bf16 on 2 ranks (bf16 model, bf16 gradient reduction, fp32 master weights): the
    run completes (the completeness check allows for bf16 rounding) and each step's values follow the fp32
    run's (Pearson R >= 0.999 per step and target)."""
    pytest.importorskip("deepspeed")
    p = demo_corpus(tmp_path / "data", 400, val=8)  # the quickstart's corpus: its 5th step failed the old check
    ds = json.loads((ROOT / "configs" / "ds_zero2.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "ds_bf16.json").write_text(json.dumps(ds))
    sets = ["--set", f"data.corpus=[{p['train']}]", "--set", f"data.validation.code={p['val_code']}",
            "--set", f"data.validation.prose={p['val_prose']}", "--set", "train.steps=6"]
    runs = {}
    for name, extra in [("fp32", []), ("bf16", ["--set", f"distributed.deepspeed={tmp_path / 'ds_bf16.json'}"])]:
        _torchrun(["--config", str(ROOT / "configs" / "demo_cpu.yaml"), *sets, *extra,
                   "--set", f"out_dir={tmp_path / name}"], cwd=ROOT)
        runs[name] = open_scores(str(tmp_path / name / "run.zarr")).step_log
    a, b = runs["fp32"], runs["bf16"]
    assert (a["sample_id"].values == b["sample_id"].values).all()
    for step in range(6):
        for k in range(2):
            x, y = a["score"].values[step, :, k], b["score"].values[step, :, k]
            r = np.corrcoef(x, y)[0, 1]
            assert r >= 0.999, (step, k, r)


# ------------------------------------------------------------------ shardshap verify
def test_verify_command_against_the_oracle(tmp_path, capsys):
    """`shardshap verify` on a small config: the secant estimator's values follow the exact Shapley values of
    the real AdamW step (R >= 0.99), and the SGD proxy is reported beside it."""
    import yaml

    from shardshap import cli
    cfg = tiny(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["verify", "--config", str(path), "--warm-steps", "3", "--checks", "1", "--batch", "6",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["estimator"]: r for r in out["rows"]}
    assert out["oracle"] == "exact" and set(rows) == {"secant/2", "adam-lagged/2", "sgd/2", "sgd/1"}
    assert min(rows["secant/2"]["pearson"]) >= 0.99, rows["secant/2"]
    assert max(rows["secant/2"]["efficiency_gap"]) <= 0.05
    assert cli.main(["verify", "--config", str(path), "--batch", "40"]) == 2  # a bad flag value
    assert "--batch 40: must be in [2, 16]" in capsys.readouterr().err


# ------------------------------------------------------------------ packed sequences, values per document
def packed(tmp_path, attention="document"):
    d = tiny(tmp_path)
    d["data"].update(packing="pack", truncate=False, attention=attention)
    return d


def test_packed_documents_are_valued_and_training_unchanged(tmp_path):
    """data.packing: pack with data.attention: document: the store's ids are the corpus's documents (manifest
    included), each step's documents are the ones its packed sequences hold, and attribution leaves training
    bit-identical."""
    from shardshap.analysis.manifest import default_path, read_manifest
    from shardshap.recipe.data import build_data
    from shardshap.recipe.train import run
    d = packed(tmp_path)
    cfg = validate(d)
    assert cfg.data.values_per == "document"
    data = build_data(cfg)
    res = run(cfg)
    store = open_scores(str(tmp_path / "run" / "run.zarr"))
    assert store.value.shape[0] == len(data.documents) == res.summary["num_samples"]
    manifest = read_manifest(default_path(str(tmp_path / "run" / "run.zarr")), len(data.documents))
    assert manifest is not None
    log = store.step_log
    seen = set()
    from shardshap.recipe.data import Sampler
    sampler = Sampler(data.pool, cfg.train.micro_batch, cfg.train.grad_accum, 1, cfg.train.seed)
    for step in range(cfg.train.steps):
        ids = data.train.position_ids_of(sampler.global_ids(step))
        seen |= set(ids[ids >= 0].tolist())
    assert set(np.flatnonzero(store.count > 0).tolist()) == seen
    assert int(store.count.sum()) == int((log.sample_id.to_numpy() >= 0).sum())
    on = res.module.state_dict()
    d["attribution"]["enabled"] = False
    plain = run(validate(d)).module.state_dict()
    for k in plain:
        assert torch.equal(on[k], plain[k]), k

    keep = sorted(seen)[::2]  # retraining on a selection of documents: only they are packed and valued
    (tmp_path / "keep.txt").write_text("".join(f"{i}\n" for i in keep))
    d["attribution"]["enabled"] = True
    d["data"]["keep"] = str(tmp_path / "keep.txt")
    d["out_dir"] = str(tmp_path / "kept")
    run(validate(d))
    kept = open_scores(str(tmp_path / "kept" / "run.zarr"))
    assert kept.value.shape[0] == len(data.documents)
    assert set(np.flatnonzero(kept.count > 0).tolist()) <= set(keep)


def test_packed_causal_documents_warn_and_document_attention_needs_packing(tmp_path):
    from shardshap.recipe.train import run
    d = packed(tmp_path, attention="causal")
    d["data"]["values_per"] = "document"
    d["train"]["steps"] = 1
    with pytest.warns(UserWarning, match="approximation"):
        run(validate(d))
    d["data"].update(packing="pad", attention="document")
    with pytest.raises(ConfigError, match="data.attention: document needs data.packing: pack"):
        validate(d)


def test_verify_with_documents_as_players(tmp_path, capsys):
    """`shardshap verify` on a packed, document-masked config: the oracle's players are the batch's documents."""
    import yaml

    from shardshap import cli
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(packed(tmp_path)))
    assert cli.main(["verify", "--config", str(path), "--warm-steps", "3", "--checks", "1", "--batch", "3",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["estimator"]: r for r in out["rows"]}
    assert out["players"] == "documents"
    assert min(rows["secant/2"]["pearson"]) >= 0.99, rows["secant/2"]
    assert max(rows["secant/2"]["efficiency_gap"]) <= 0.05
