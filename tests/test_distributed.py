# Run: OMP_NUM_THREADS=1 pytest tests/test_distributed.py -q -m "slow or not slow"
#      (the 2-process runs are slow: 2-3 processes each load torch; the unit tests are fast)
"""Data parallelism (common/distributed.py) against one process: 2 CPU processes on gloo.

One GRPO step on fixed rollouts gives the same adapter, loss, grad_norm and metrics on 2
processes as on one, for every loss type and both scale_rewards modes (and with a rank whose
groups are all dropped); the same test with the dapo count left local, or without gradient
averaging, finds a difference (so it can fail). SFT: the same. The slow tier runs the user's
command, `torchrun --nproc_per_node 2 gog.py --stage all --model tiny`, a resume on 2
processes, and a sharded eval whose results.json equals one process's.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from common import distributed as dist
from helpers import ROOT, scripted_rollouts

G = 4
LENGTHS = [3, 7, 5, 9, 12, 4, 10, 6]                 # 2 groups of G: 24 and 32 tokens
REWARDS = {"spread": [[1.0, 0.0, 0.0, 1.0], [0.5, 0.2, 0.9, 0.1]],
           "flat": [[1.0, 1.0, 1.0, 1.0], [0.5, 0.2, 0.9, 0.1]]}   # group 0 has std 0
CASES = [dict(loss_type=lt, scale_rewards=sr) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
         for sr in ("group", "batch")] + [dict(loss_type="grpo", scale_rewards="group",
                                               drop_zero_std_groups=True, rewards="flat"),
                                          dict(sft=True)]
SABOTAGE = {"local_dapo_count": ["dapo"], "no_gradient_averaging": ["grpo", "dapo", "sft"]}
METRICS = ("loss", "grad_norm", "kl", "entropy", "reward", "reward_std", "completion_length",
           "clip_ratio/region_mean")


def grpo_step(out_dir: str, case: dict) -> dict:
    """One train_grpo step on the fixed rollouts; {"params": adapter after the update (rank 0),
    "row": the metrics row} (in every process; only rank 0's is compared)."""
    from common.grpo import GRPOConfig, train_grpo
    from common.models import load_policy
    from common.rollout import Rollout
    case = dict(case)
    rewards = REWARDS[case.pop("rewards", "spread")]
    policy = load_policy("tiny", seed=0)
    g = torch.Generator().manual_seed(3)
    for p in policy.trainable_parameters():   # off zero: policy != reference, A gets gradients
        p.data = torch.randn(p.shape, generator=g) * 0.05
    policy.frozen_reference = lambda: __import__("contextlib").nullcontext()  # pi_ref: adapter off
    fixed = scripted_rollouts(LENGTHS)
    cfg = GRPOConfig(**{**dict(learning_rate=1e-3, num_generations=G, prompts_per_step=2,
                               max_steps=1, beta=0.04, max_completion_length=max(LENGTHS),
                               micro_batch_size=2, logprob_chunk_tokens=7, num_iterations=2,
                               epsilon=0.05), **case})
    train_grpo(policy, [{"id": 0}, {"id": 1}],
               lambda p, exs, c: [Rollout(**vars(r)) for e in exs
                                  for r in fixed[e["id"] * G:(e["id"] + 1) * G]],
               lambda group, ex: [{"reward": r} for r in rewards[ex["id"]]], cfg, out_dir)
    params = [p.detach().clone() for p in policy.trainable_parameters()]
    row = json.loads(open(f"{out_dir}/metrics.jsonl").readlines()[-1]) if dist.is_main() else {}
    return {"params": params, "row": row}


def sft_steps(out_dir: str, case: dict) -> dict:
    """Two SFT steps of 5 sequences of different lengths (3 micro-batches one process, 2 + 1 per
    rank on two); {"params", "row"} as grpo_step."""
    from common.chat import encode_text
    from common.models import load_policy
    from common.sft import SFTConfig, train_sft
    policy = load_policy("tiny", seed=0)
    words = "the quick brown fox jumps over a lazy dog and runs far away".split()
    samples = [encode_text(policy.tokenizer, " ".join(words[: 3 + 2 * i])) for i in range(5)]
    train_sft(policy, samples, SFTConfig(learning_rate=1e-3, batch_size=5, micro_batch_size=2,
                                         max_steps=2, warmup_ratio=0.0), out_dir)
    params = [p.detach().clone() for p in policy.trainable_parameters()]
    row = json.loads(open(f"{out_dir}/metrics.jsonl").readlines()[-1]) if dist.is_main() else {}
    return {"params": params, "row": row}


def run_job(out_dir: str, case: dict) -> dict:
    return sft_steps(out_dir, case) if case.get("sft") else grpo_step(out_dir, case)


def join(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank `rank` of a `world`-process gloo group, one thread."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init()


def _worker(rank: int, world: int, port: int, tmp: str, jobs: list) -> None:
    """One of `world` processes: run every (case, sabotage) job, rank 0 saves the results."""
    join(rank, world, port)
    import common.grpo as grpo
    real_counts, real_average = grpo.global_counts, dist.average_gradients
    out = []
    for k, (case, sabotage) in enumerate(jobs):
        # broken on purpose: dapo's token count of this rank only / each rank keeps its gradient
        grpo.global_counts = ((lambda a, b, c: [*real_counts(a, b, c)[:2], c])
                              if sabotage == "local_dapo_count" else real_counts)
        dist.average_gradients = ((lambda params: None) if sabotage == "no_gradient_averaging"
                                  else real_average)
        out.append(run_job(os.path.join(tmp, f"job{k}"), case))
    if rank == 0:
        torch.save(out, os.path.join(tmp, "two.pt"))
    dist.close()


def _sft_on_different_data(rank: int, world: int, port: int, tmp: str) -> None:
    """Rank 1 has one sequence the other ranks lack: train_sft must refuse on every rank (a
    stage whose SFT data depends on each rank's samples would otherwise average the gradients
    of different datasets)."""
    join(rank, world, port)
    from common.chat import encode_text
    from common.models import load_policy
    from common.sft import SFTConfig, train_sft
    policy = load_policy("tiny", seed=0)
    texts = ["a b c", "d e f g", "h i"] + (["j k l"] if rank == 1 else [])
    said = []
    try:
        train_sft(policy, [encode_text(policy.tokenizer, t) for t in texts],
                  SFTConfig(max_steps=1, batch_size=2), os.path.join(tmp, "sft"))
        said.append("trained")
    except RuntimeError as e:
        said.append(str(e))
    # GRPO: the ranks draw each step's prompts by index from their dataset (here rank 1's
    # difficulty weights differ, as they would from pass rates each rank sampled on its own)
    from common.grpo import GRPOConfig, train_grpo
    from common.rollout import Rollout
    fixed = scripted_rollouts([3, 5, 4, 6])
    try:
        train_grpo(policy, [{"id": 0}, {"id": 1}],
                   lambda p, exs, c: [Rollout(**vars(r)) for e in exs
                                      for r in fixed[e["id"] * 2:(e["id"] + 1) * 2]],
                   lambda group, ex: [{"reward": 1.0}, {"reward": 0.0}],
                   GRPOConfig(max_steps=1, num_generations=2, prompts_per_step=2,
                              max_completion_length=6),
                   os.path.join(tmp, "rl"), weights=[0.5, 0.5 if rank == 0 else 0.25])
        said.append("trained")
    except RuntimeError as e:
        said.append(str(e))
    open(os.path.join(tmp, f"rank{rank}.txt"), "w").write("\n".join(said))
    dist.close()


@pytest.mark.slow
def test_sft_and_grpo_refuse_data_that_differ_between_ranks(tmp_path):
    mp.spawn(_sft_on_different_data, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        sft, grpo = open(tmp_path / f"rank{r}.txt").read().split("\n")
        assert sft.startswith("The SFT samples differ between the 2 processes"), sft
        assert grpo.startswith("The GRPO datasets differ between the 2 processes"), grpo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a: dict, b: dict) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"]))


@pytest.fixture(scope="module")
def two_vs_one(tmp_path_factory):
    """Every case (and the sabotaged ones) on 2 gloo processes and in this one process."""
    tmp = str(tmp_path_factory.mktemp("ddp"))
    jobs = [(c, None) for c in CASES] + [
        (dict(sft=True) if lt == "sft" else dict(loss_type=lt, scale_rewards="group"), s)
        for s, lts in SABOTAGE.items() for lt in lts]
    mp.spawn(_worker, args=(2, free_port(), tmp, jobs), nprocs=2, join=True)
    two = torch.load(os.path.join(tmp, "two.pt"))
    one = [run_job(os.path.join(tmp, f"one{k}"), case) for k, (case, _) in enumerate(jobs)]
    return jobs, one, two


def test_helpers_without_a_launcher_are_the_identity():
    assert dist.world_size() == 1 and dist.is_main() and not dist.active()
    assert dist.shard([1, 2, 3]) == [1, 2, 3] and dist.gather_in_order([4]) == [4]
    assert dist.all_reduce([1.5, 2]) == [1.5, 2] and dist.describe(7) == {}
    assert dist.run_sharded(lambda xs: [x * 2 for x in xs], [1, 2]) == [2, 4]
    dist.require_same_on_every_rank("a", "items")      # one process: nothing to compare


def test_shards_are_contiguous_whole_items_in_order():
    items = list(range(7))
    for world in (1, 2, 3, 4, 8):
        parts = [items[slice(*dist.shard_bounds(len(items), world, r))] for r in range(world)]
        assert [x for p in parts for x in p] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow     # the fixture: 3 processes x 13 steps: ~45 s CPU, 150 s on 2 busy cores
@pytest.mark.parametrize("k", range(len(CASES)),
                         ids=["sft" if c.get("sft") else "-".join(map(str, c.values()))
                              for c in CASES])
def test_two_processes_give_the_one_process_update(two_vs_one, k):
    jobs, one, two = two_vs_one
    assert jobs[k][1] is None
    assert max_diff(one[k], two[k]) < 1e-6
    for m in METRICS if "loss_type" in jobs[k][0] else ("loss", "grad_norm", "tokens"):
        assert two[k]["row"][m] == pytest.approx(one[k]["row"][m], rel=1e-6, abs=1e-7), m
    assert one[k]["params"][0].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", list(SABOTAGE))
def test_the_comparison_fails_when_the_update_is_broken_on_purpose(two_vs_one, sabotage):
    jobs, one, two = two_vs_one
    found = [(c.get("loss_type", "sft"), max_diff(o, t)) for (c, s), o, t in zip(jobs, one, two)
             if s == sabotage]
    assert [lt for lt, _ in found] == SABOTAGE[sabotage]
    assert all(d > 1e-4 for _, d in found), found


def test_a_resume_on_another_world_size_is_one_sentence(tmp_path):
    from common.checkpoint import check_world_size
    from common.errors import UserError
    check_world_size({"world_size": 1}, "ck")
    check_world_size({}, "ck")     # checkpoints saved before this module: one process
    with pytest.raises(UserError, match=r"saved by 2 process\(es\) and this run has 1") as e:
        check_world_size({"world_size": 2}, str(tmp_path))
    assert "\n" not in str(e.value) and "--nproc_per_node 2" in str(e.value)


def test_prompts_that_do_not_divide_among_processes_are_refused(monkeypatch):
    from common.errors import UserError
    from common.grpo import GRPOConfig, check_config
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="prompts_per_step=3 does not divide among 2 processes"):
        check_config(GRPOConfig(prompts_per_step=3))
    check_config(GRPOConfig(prompts_per_step=4))


# ---------------------------------------------------------------------------------------------
# the user's commands (slow: each run loads torch in 2 or 3 processes)
# ---------------------------------------------------------------------------------------------
def torchrun(*argv, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, MPLBACKEND="Agg",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *argv] if nproc else [sys.executable, *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def steps(path: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(path)]


@pytest.mark.slow
def test_torchrun_gog_all_stages_on_two_processes(tmp_path):
    out = str(tmp_path / "run")
    p = torchrun("gog.py", "--stage", "all", "--model", "tiny", "--out", out)
    assert "2 processes: each takes 1 of the 2 prompts per step" in p.stdout
    assert steps(f"{out}/rl/metrics.jsonl") == [0, 1]      # written once, by rank 0
    assert steps(f"{out}/sft/metrics.jsonl") == [0, 1, 2]
    summary = json.load(open(f"{out}/rl/summary.json"))
    assert summary["distributed"]["sampling_seeds"] == [0, 1]
    assert json.load(open(f"{out}/args.json"))["world_size"] == 2
    for f in ("eval/results.json", "ablate/results.json", "rl/adapter/adapter_config.json"):
        assert os.path.isfile(f"{out}/{f}"), f


@pytest.mark.slow
def test_torchrun_resume_continues_exactly(tmp_path):
    """rl for 1 step with a checkpoint, then --resume to 3 steps == 3 steps in one go."""
    common = ["gog.py", "--stage", "rl", "--model", "tiny", "--save_steps", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torchrun(*common, "--max_steps", "3", "--out", a)
    torchrun(*common, "--max_steps", "1", "--out", b)
    torchrun(*common, "--max_steps", "3", "--resume", "--out", b)
    rows_a = [json.loads(x) for x in open(f"{a}/rl/metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(f"{b}/rl/metrics.jsonl")]
    assert [r["step"] for r in rows_b] == [0, 1, 2]
    drop = ("time/", "tokens_per_s")
    assert ([{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows_a]
            == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows_b])
    from safetensors.torch import load_file
    wa, wb = (load_file(f"{d}/rl/adapter/adapter_model.safetensors") for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    p = subprocess.run([sys.executable, *common, "--max_steps", "4", "--resume",
                        "--out", b], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and "saved by 2 process(es) and this run has 1" in p.stderr


SHARDED = {   # script: (flags of its greedy eval, the stages that write what eval reads)
    "gog.py": (["--n_scenes", "8"], ()),
    "lras.py": (["--eval_temperature", "0"], ()),
    "am3safety.py": (["--num_seeds", "16", "--eval_dialogues", "5", "--max_turns", "2"],
                     ("build",)),
    "cot_causal.py": (["--grid", "small", "--n_pairs", "12", "--n_probes", "3", "--n_heldout",
                       "2", "--max_completion_length", "16", "--think_budget", "8",
                       "--temperature", "0", "--max_steps", "1", "--batch_size", "4"],
                      ("data", "train")),
    "prm_bench.py": (["--n_scenes", "2", "--max_turns", "2", "--batch_size", "4",
                      "--judge_max_new_tokens", "4"], ("data",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SHARDED))
def test_a_sharded_eval_writes_the_one_process_results(tmp_path, script):
    """The eval's items split by rank and gathered in order: a greedy eval on 2 processes writes
    the very results.json of one process (every script's eval generation is split)."""
    flags, before = SHARDED[script]
    out = str(tmp_path / "run")
    for stage in before:
        torchrun(script, "--stage", stage, "--model", "tiny", "--out", out, *flags, nproc=0)
    argv = [script, "--stage", "eval", "--model", "tiny", "--out", out, *flags]
    p = torchrun(*argv)
    two = open(f"{out}/eval/results.json").read()
    shutil.rmtree(f"{out}/eval")
    torchrun(*argv, nproc=0)
    assert open(f"{out}/eval/results.json").read() == two, p.stdout[-2000:]


@pytest.mark.slow
def test_prm_bench_policy_candidates_are_split_and_scored_in_order(tmp_path):
    """best-of-N with the policy's own candidates: the questions are split by rank and the
    candidates gathered, so every rank judges the same ones. Sampled (each rank its own seed):
    were each rank to sample its own candidates, the judged steps would be paired with another
    rank's candidates; score_steps refuses that (watched: without the split the run stops there).
    Greedy: 2 processes write the one-process results."""
    out = str(tmp_path / "run")
    argv = ["prm_bench.py", "--stage", "search", "--model", "tiny", "--out", out,
            "--search_source", "policy", "--n_scenes", "2", "--max_turns", "2",
            "--search_questions", "3", "--search_n", "1,2", "--search_repeats", "4",
            "--batch_size", "4", "--judge_max_new_tokens", "4", "--max_completion_length", "16"]
    torchrun(*argv, "--temperature", "1.0")
    res = json.load(open(f"{out}/search/results.json"))
    assert res["questions"] == 3 and res["candidates_per_question"] == 2
    shutil.rmtree(f"{out}/search")
    torchrun(*argv, "--temperature", "0")
    two = open(f"{out}/search/results.json").read()
    shutil.rmtree(f"{out}/search")
    torchrun(*argv, "--temperature", "0", nproc=0)
    assert open(f"{out}/search/results.json").read() == two
