# Sourced by the sbatch scripts of this folder: the torchrun rendezvous of a Slurm job, and one launcher per node.
#
# From Slurm's environment: NNODES = SLURM_NNODES; MASTER_ADDR = the first host of SLURM_JOB_NODELIST
# (scontrol show hostnames); MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 (two jobs sharing a node do not collide);
# GPUS_PER_NODE = SLURM_GPUS_ON_NODE; NODE_RANK = SLURM_NODEID, read inside each node's task. Each one set in the
# environment wins.
#
# run_on_every_node SCRIPT ARGS...: one srun task per node, each running `bash SCRIPT ARGS...` (the example
# launcher, whose torchrun starts GPUS_PER_NODE processes). DRY_RUN=1 launches nothing: it prints the srun
# command, then node 0's torchrun command (the launcher run with LAUNCHER=echo), so a job is checked off-cluster:
#   DRY_RUN=1 SLURM_JOB_ID=1 SLURM_NNODES=2 SLURM_JOB_NODELIST=gpu[01-02] SLURM_SUBMIT_DIR=$PWD \
#     bash examples/slurm/pretrain_7b.sbatch        # without scontrol, gpu[01-02] gives master gpu01

first_host() {  # the first host name of a Slurm node list such as gpu[01-04,09],cpu07 (gpu01)
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
  elif [[ $1 =~ ^([^,[]+)\[([0-9]+) ]]; then  # no scontrol (a dry run): the first number of the first range
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "${1%%,*}"
  fi
}

: "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch (or set DRY_RUN=1 and a fake SLURM_* environment)}"
export NNODES=${NNODES:-$SLURM_NNODES}
export MASTER_ADDR=${MASTER_ADDR:-$(first_host "$SLURM_JOB_NODELIST")}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}

run_on_every_node() {
  local node_command=(bash -c 'NODE_RANK=${NODE_RANK:-$SLURM_NODEID} exec bash "$@"' node "$@")
  local srun_command=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 "${node_command[@]}")
  echo "rendezvous: $NNODES node(s) x $GPUS_PER_NODE GPU(s), master $MASTER_ADDR:$MASTER_PORT"
  if [ -n "${DRY_RUN:-}" ]; then
    echo "would run: ${srun_command[*]}"
    SLURM_NODEID=0 LAUNCHER=echo "${node_command[@]}"
  else
    "${srun_command[@]}"
  fi
}
