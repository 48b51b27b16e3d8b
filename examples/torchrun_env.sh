# The rendezvous of the example launchers (pretrain_7b.sh, sft.sh, dpo.sh), sourced by each: one node with every
# visible GPU by default; on several nodes set NNODES, NODE_RANK and MASTER_ADDR (examples/slurm/ sets them from
# Slurm's environment). PYTHON names the interpreter that asks torch how many GPUs this node has. TORCHRUN is the
# torchrun command with that rendezvous: "${TORCHRUN[@]}" -m megatron_llama.pretrain ...
GPUS_PER_NODE=${GPUS_PER_NODE:-$("${PYTHON:-python3}" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TORCHRUN=(torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
