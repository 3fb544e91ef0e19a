"""Distributed optical training computes the single-device run (CPU, gloo, through run.py).

Same seed checkpoint, same global batch (the data files are laid out so that every layout sees
the same global batches), 10 steps:
- full and selective (op-level, every-2nd-layer) activation checkpointing vs none: bit-identical
  losses (recompute redraws the same noise);
- gradient accumulation (2 micro-batches) vs one batch: equal up to the noise draws;
- FSDP=2 vs one process: equal within float32 accumulation tolerance;
- HSDP (replicate 2 across two torchrun "nodes" x shard 2) vs one process: the same tolerance;
- TP=2 vs one process: the first (calibration) step equal; later steps within 1%: the forward is
  the same function up to accumulation order (tests/test_tensor_parallel.py checks that exactly),
  and quantization turns last-bit differences of trained weights into whole-level differences,
  which training then amplifies;
- every run asserts after every step that all ranks hold identical ranges
  (`--optical.check_ranges_synced`).
"""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_e2e import ROOT, losses, torchrun

pytestmark = pytest.mark.slow

SEQ = 32  # 64 gives the same comparisons at twice the step cost (it goes with the tokens)
STEPS = 10
GLOBAL_BATCH = 4


def _documents(n: int) -> list[str]:
    """Texts that tokenize to exactly SEQ - 1 tokens (+BOS +EOS = one training sample each)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "torchtitan_ext/data/assets/tokenizer/tokenizer.json"))
    with gzip.open(ROOT / "torchtitan_ext/data/assets/corpus/validation.jsonl.gz", "rt") as f:
        text = "".join(json.loads(line)["text"] for line in f)
    ids = tok.encode(text).ids
    body = SEQ - 1
    docs = []
    for i in range(0, len(ids) - body, body):
        piece = tok.decode(ids[i:i + body])
        if tok.encode(piece).ids == ids[i:i + body]:
            docs.append(piece)
            if len(docs) == n:
                return docs
    raise AssertionError("not enough round-tripping pieces")


def _write(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def dp_layout(docs: list[str], steps: int, global_batch: int, ranks: int) -> list[str]:
    """Order documents for `ranks` data-parallel ranks so they see the one-process global
    batches: ranks take contiguous parts of the file, and rank r's s-th local batch must be the
    r-th part of global batch s."""
    part = global_batch // ranks
    shards = [[] for _ in range(ranks)]
    for s in range(steps):
        for r in range(ranks):
            start = global_batch * s + r * part
            shards[r] += docs[start:start + part]
    return [d for shard in shards for d in shard]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    docs = _documents(STEPS * GLOBAL_BATCH)
    single = _write(tmp / "single.jsonl", docs)
    dp2 = _write(tmp / "dp2.jsonl", dp_layout(docs, STEPS, GLOBAL_BATCH, 2))
    common = ["--job.config_file", "train_configs/debug_model.toml", "--training.steps", str(STEPS),
              "--training.seq_len", str(SEQ), "--training.dataset", "local", "--debug.seed", "3",
              "--optical.check_ranges_synced", "--metrics.log_freq", "1"]
    seed = torchrun(1, *common, "--training.dataset_path", single, "--checkpoint.enable",
                    "--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(tmp / "seed"))
    assert seed.returncode == 0, (seed.stdout + seed.stderr)[-3000:]
    load = ["--checkpoint.enable", "--checkpoint.initial_load_path",
            str(tmp / "seed" / "checkpoint" / "step-0"), "--checkpoint.interval", "1000"]

    def run(name, nproc, data, *extra):
        r = torchrun(nproc, *common, *load, "--training.dataset_path", data,
                     "--job.dump_folder", str(tmp / name), *extra)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-4000:]
        got = losses(log)
        assert sorted(got) == list(range(1, STEPS + 1)), got
        return got

    def run_two_nodes(name, nproc_per_node, data, *extra):
        """Two torchrun agents (`--nnodes 2`, c10d rendezvous on localhost), as two hosts would
        be launched."""
        from test_faults import two_node_jobs, wait_all

        nodes = two_node_jobs(
            nproc_per_node,
            lambda n: [*common, *load, "--training.dataset_path", data,
                       "--job.dump_folder", str(tmp / f"{name}{n}"), *extra],
            lambda n: tmp / f"{name}{n}.log")
        rcs = wait_all(nodes, timeout=600)
        logs = [j.output() for j in nodes]
        for n in (0, 1):
            assert rcs[n] == 0, (n, logs[n][-4000:])
        got = losses(logs[0])
        assert sorted(got) == list(range(1, STEPS + 1)), got
        return got, logs

    dp4 = _write(tmp / "dp4.jsonl", dp_layout(docs, STEPS, GLOBAL_BATCH, 4))
    return SimpleNamespace(run=run, run_two_nodes=run_two_nodes, single=single, dp2=dp2, dp4=dp4)


@pytest.fixture(scope="module")
def single_run(setup):
    return setup.run("single", 1, setup.single, "--training.local_batch_size", str(GLOBAL_BATCH))


def test_full_activation_checkpointing_is_bit_identical(setup, single_run):
    ac = setup.run("ac", 1, setup.single, "--training.local_batch_size", str(GLOBAL_BATCH),
             "--activation_checkpoint.mode", "full")
    assert ac == single_run


@pytest.mark.parametrize("option", ["op", "2", "2-save-attention"],
                         ids=["selective-op", "selective-every-2nd-layer", "every-2nd-saving-attention"])
def test_selective_activation_checkpointing_is_bit_identical(setup, single_run, option):
    # Op-level SAC saves the optical attention and every second matmul (optical linears
    # included) and recomputes the rest, which must redraw the seeds they drew the first time;
    # optical.ac_save_attention saves the attention of the layers that layer AC recomputes.
    sac = setup.run(f"sac_{option}", 1, setup.single, "--training.local_batch_size", str(GLOBAL_BATCH),
                    "--activation_checkpoint.mode", "selective",
                    "--activation_checkpoint.selective_ac_option", option.split("-")[0],
                    *(["--optical.ac_save_attention"] if option.endswith("attention") else []))
    assert sac == single_run


def test_gradient_accumulation_matches_the_full_batch(setup, single_run):
    """Two micro-batches of 2 per step against one batch of 4. The micro-batches are separate
    forwards: each draws its own noise seeds (the full batch draws one per layer), and ranges
    observe both, min/max alike, so the steps agree up to the noise draws."""
    accum = setup.run("accum", 1, setup.single, "--training.local_batch_size", str(GLOBAL_BATCH // 2),
                      "--training.global_batch_size", str(GLOBAL_BATCH))
    assert accum[1] == single_run[1]  # calibration step: no noise yet
    for s in range(1, STEPS + 1):
        assert abs(accum[s] - single_run[s]) <= 2e-3 * single_run[s], (s, accum, single_run)


@pytest.mark.parametrize("reshard", ["default", "never"])
def test_fsdp2_equals_single_device(setup, single_run, reshard):
    fsdp = setup.run(f"fsdp_{reshard}", 2, setup.dp2, "--training.local_batch_size",
                     str(GLOBAL_BATCH // 2), "--parallelism.data_parallel_shard_degree", "2",
                     "--parallelism.fsdp_reshard_after_forward", reshard)
    for s in range(1, STEPS + 1):
        assert abs(fsdp[s] - single_run[s]) <= 1e-3 * single_run[s], (s, fsdp, single_run)


def test_tp2_equals_single_device(setup, single_run):
    tp = setup.run("tp", 2, setup.single, "--training.local_batch_size", str(GLOBAL_BATCH),
             "--parallelism.tensor_parallel_degree", "2")
    assert abs(tp[1] - single_run[1]) <= 1e-5 * single_run[1]
    for s in range(1, STEPS + 1):
        assert abs(tp[s] - single_run[s]) <= 1e-2 * single_run[s], (s, tp, single_run)


def test_hsdp_across_two_nodes_equals_single_device(setup, single_run):
    """HSDP as on two hosts: two torchrun agents of 2 processes each, replicate 2 (across the
    "nodes") x shard 2 (within each), 4 data-parallel ranks of one sample each."""
    hsdp, logs = setup.run_two_nodes(
        "hsdp", 2, setup.dp4, "--training.local_batch_size", str(GLOBAL_BATCH // 4),
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "2")
    assert "dp_replicate=2, dp_shard=2" in logs[0], logs[0][-3000:]
    assert "Applied HSDP to the model" in logs[0], logs[0][-3000:]
    for s in range(1, STEPS + 1):
        assert abs(hsdp[s] - single_run[s]) <= 1e-3 * single_run[s], (s, hsdp, single_run)

