#!/usr/bin/env bash
# OpenRLHF's dotted flags of OpenRLHF/OpenRLHF@3c3be623; give the prompt dataset and logging as extra arguments
set -euo pipefail
python3 -m openrlhf.cli.train_ppo_ray \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --critic.num_nodes 1 \
   --critic.num_gpus_per_node 8 \
   --reward.num_nodes 1 \
   --reward.num_gpus_per_node 8 \
   --train.colocate_all \
   --vllm.num_engines 8 \
   --vllm.tensor_parallel_size 1 \
   --vllm.gpu_memory_utilization 0.9 \
   --ds.zero_stage 3 \
   --ds.tensor_parallel_size 1 \
   --ds.param_dtype bf16 \
   --train.micro_batch_size 8 \
   --rollout.micro_batch_size 8 \
   --rollout.batch_size 512 \
   --rollout.n_samples_per_prompt 1 \
   --train.batch_size 128 \
   --train.max_epochs 1 \
   --data.max_len 256 \
   --rollout.max_new_tokens 128 \
   --rollout.temperature 1 \
   --actor.model_name_or_path meta-llama/Llama-2-7b-hf \
   --critic.model_name_or_path meta-llama/Llama-2-7b-hf \
   --reward.model_name_or_path meta-llama/Llama-2-7b-hf \
   --actor.adam.lr 1e-06 \
   --actor.eps_clip 0.2 \
   --algo.kl.init_coef 0.05 \
   --algo.advantage.estimator gae \
   --critic.adam.lr 1e-06 \
   --critic.value_clip 0.2 \
   --algo.advantage.gamma 1 \
   --algo.advantage.lambd 0.95 \
   "$@"
