#!/bin/bash
# The idle-machine measurements in the README (issue 19): bash docs/bench/run_idle.sh . (nothing else may run; ~30 min)
set -x
B="python -m common.perf.bench --no-limits"
cd "${1:-.}"
export HF_HUB_OFFLINE=1
L=${LOGS:-runs/bench_logs}; mkdir -p $L
uptime > $L/uptime_start.txt
# 1) fair TRL comparison, text, fast path (the default of run_rollouts), >= 5 steps
python -m common.perf.bench --model smollm2 --num_generations 8 --max_new_tokens 32 --beta 0.04 --vs-trl --threads 2 --steps 5 --warmup 1 --fastgen --out /tmp/pb/s_trl > $L/smol_trl.log 2>&1
python -m common.perf.bench --model tiny --num_generations 8 --max_new_tokens 64 --beta 0.04 --vs-trl --threads 2 --steps 5 --warmup 1 --fastgen --out /tmp/pb/t_trl > $L/tiny_trl.log 2>&1
# 2) plain vs fast, ours only, alternating A B A B
for r in 1 2; do
  $B --model smollm2 --num_generations 8 --max_new_tokens 32 --beta 0.04 --threads 2 --steps 5 --warmup 1 --out /tmp/pb/s_plain$r > $L/smol_plain_$r.log 2>&1
  $B --model smollm2 --num_generations 8 --max_new_tokens 32 --beta 0.04 --threads 2 --steps 5 --warmup 1 --fastgen --out /tmp/pb/s_fast$r > $L/smol_fast_$r.log 2>&1
done
# 3) multi-turn: the agent workload (2 tool turns + answer), re-prefill (plain) vs KV kept (fast)
for r in 1 2; do
  $B --model smollm2 --workload agent --num_generations 8 --max_new_tokens 32 --observation_tokens 48 --beta 0.04 --threads 2 --steps 5 --warmup 1 --out /tmp/pb/a_plain$r > $L/smol_agent_plain_$r.log 2>&1
  $B --model smollm2 --workload agent --num_generations 8 --max_new_tokens 32 --observation_tokens 48 --beta 0.04 --threads 2 --steps 5 --warmup 1 --fastgen --out /tmp/pb/a_fast$r > $L/smol_agent_fast_$r.log 2>&1
  $B --model tiny --workload agent --num_generations 8 --max_new_tokens 64 --beta 0.04 --threads 2 --steps 5 --warmup 1 --out /tmp/pb/ta_plain$r > $L/tiny_agent_plain_$r.log 2>&1
  $B --model tiny --workload agent --num_generations 8 --max_new_tokens 64 --beta 0.04 --threads 2 --steps 5 --warmup 1 --fastgen --out /tmp/pb/ta_fast$r > $L/tiny_agent_fast_$r.log 2>&1
done
uptime > $L/uptime_end.txt
