#!/usr/bin/env bash
# OpenRLHF's dotted flags of OpenRLHF/OpenRLHF@3c3be623; give the prompt dataset and logging as extra arguments
set -euo pipefail
python3 -m openrlhf.cli.train_ppo_ray \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --train.colocate_all \
   --vllm.num_engines 2 \
   --vllm.tensor_parallel_size 4 \
   --vllm.gpu_memory_utilization 0.6 \
   --ds.zero_stage 3 \
   --ds.tensor_parallel_size 2 \
   --ds.param_dtype bf16 \
   --train.dynamic_batch_enable \
   --ds.packing_samples \
   --train.max_tokens_per_gpu 4352 \
   --rollout.max_tokens_per_gpu 4352 \
   --rollout.batch_size 64 \
   --rollout.n_samples_per_prompt 32 \
   --train.batch_size 512 \
   --train.max_epochs 1 \
   --data.max_len 4352 \
   --rollout.max_new_tokens 4096 \
   --rollout.temperature 1 \
   --actor.model_name_or_path meta-llama/Meta-Llama-3-8B \
   --actor.adam.lr 1e-06 \
   --actor.eps_clip 0.2 \
   --algo.kl.init_coef 0.05 \
   --algo.advantage.estimator group_norm \
   --algo.kl.use_loss \
   --algo.kl.estimator k3 \
   "$@"
