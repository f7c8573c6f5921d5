#!/usr/bin/env bash
# Distributed training with lightning_ckpt under torchrun, through LightningCLI and configs/ddp.yaml.
#
#   bash examples/ddp_torchrun.sh cpu [NPROC]       # CPU processes, gloo (default: 2)
#   bash examples/ddp_torchrun.sh gpu [NGPU]        # one process per GPU, NCCL for training
#   bash examples/ddp_torchrun.sh two-nodes         # two "nodes" on this machine: --nnodes 2, one process each
#
# Checkpoints go to runs/ddp (every rank writes its share of each checkpoint, rank 0 commits); afterwards:
# lightning-ckpt ls runs/ddp ; the merged weights are in runs/ddp/merged/model.safetensors.
#
# two-nodes: each "node" runs in its own working directory (runs/node0, runs/node1), so the YAML's relative
# dirpath is a node-local folder, as on machines without a shared filesystem: runs/node0/runs/ddp and
# runs/node1/runs/ddp. The ranks find out they do not share the folder; each node's folder then holds every
# checkpoint whole (its ranks split the model and optimizer; every rank's RNG and loader state is copied in), and a
# checkpoint is committed in either folder only once both nodes wrote their part. Either folder resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-cpu}"
case "$what" in
  cpu)
    n="${2:-2}"
    torchrun --standalone --nproc_per_node "$n" examples/cli.py fit --config configs/ddp.yaml --trainer.devices "$n"
    ;;
  gpu)
    n="${2:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}"
    torchrun --standalone --nproc_per_node "$n" examples/cli.py fit --config configs/ddp.yaml \
      --trainer.accelerator gpu --trainer.devices "$n"
    ;;
  two-nodes)
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    root="$PWD"
    pids=()
    for node in 0 1; do
      mkdir -p "runs/node$node"
      (cd "runs/node$node" && torchrun --nnodes 2 --node_rank "$node" --nproc_per_node 1 --master_addr 127.0.0.1 \
        --master_port "$port" "$root/examples/cli.py" fit --config "$root/configs/ddp.yaml" \
        --trainer.devices 1 --trainer.num_nodes 2) &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    python3 -m lightning_ckpt.cli ls runs/node0/runs/ddp
    python3 -m lightning_ckpt.cli ls runs/node1/runs/ddp
    exit 0
    ;;
  *)
    echo "usage: $0 cpu [NPROC] | gpu [NGPU] | two-nodes" >&2
    exit 2
    ;;
esac
python3 -m lightning_ckpt.cli ls runs/ddp
