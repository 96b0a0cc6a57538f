#!/usr/bin/env bash
# The network every node of cluster-gcp.yaml runs in, made once per project and region with your own gcloud login
# (README, "On a cluster", step 2). Ray's GCP provider adds no firewall rule of its own, and left to itself puts
# every node, with a public address, on the region's first subnet: usually the default network, whose
# default-allow-internal rule lets every VM of the project reach every Ray port. Here instead:
#   - a VPC of its own (`raysys`, custom subnets): a new network admits no ingress but the rules below;
#   - its subnet `raysys` with Private Google Access: workers have no public address and still reach Cloud Storage;
#   - a Cloud Router with Cloud NAT: their way out to PyPI and the GPU driver downloads, nothing comes in;
#   - firewall rule raysys-ssh: SSH (22) from your range to the head (network tag raysys-head) only;
#   - firewall rule raysys-internal: every TCP and UDP port from the cluster's nodes (tag raysys) to them, as the
#     GCS, raylets, object transfers, workers, metrics and the DDP ranks' NCCL listen on ports of their choosing.
#
#   cluster/gcp-network.sh my-project 203.0.113.7/32               # your address: curl -s https://ifconfig.me
#   cluster/gcp-network.sh my-project 203.0.113.0/24 europe-west4  # another region: as in cluster-gcp.yaml
#
# Run again, it keeps what exists and sets both rules' ports, sources and targets again, so a new range replaces
# the old one.
# 0.0.0.0/0 (any /0) is refused unless --force comes first.
set -euo pipefail

usage() {
  echo "usage: $0 [--force] PROJECT CIDR [REGION]   CIDR: where SSH may come from, e.g. 203.0.113.7/32" >&2
  exit 2
}

source "$(dirname "$0")/ssh-range.sh"

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
[ $# -ge 2 ] && [ $# -le 3 ] || usage
project=$1 cidr=$2 region=${3:-us-central1} name=raysys
check_ssh_range "$cidr" "$force"

g() { gcloud --project="$project" --quiet "$@"; }
absent() { ! g "$@" >/dev/null 2>&1; }  # a `describe` that fails: not there yet

if absent compute networks describe "$name"; then
  g compute networks create "$name" --subnet-mode=custom
fi
if absent compute networks subnets describe "$name" --region="$region"; then
  g compute networks subnets create "$name" --network="$name" --region="$region" --range=10.20.0.0/20 \
    --enable-private-ip-google-access
fi
if absent compute routers describe "$name" --region="$region"; then
  g compute routers create "$name" --network="$name" --region="$region"
fi
if absent compute routers nats describe "$name" --router="$name" --region="$region"; then
  g compute routers nats create "$name" --router="$name" --region="$region" --auto-allocate-nat-external-ips \
    --nat-all-subnet-ip-ranges
fi

# An ingress rule of the network, created or set to exactly these flags.
rule() {
  local rule=$1
  shift
  if absent compute firewall-rules describe "$rule"; then
    g compute firewall-rules create "$rule" --network="$name" --direction=INGRESS --action=ALLOW "$@"
  else
    g compute firewall-rules update "$rule" "$@"
  fi
}
rule raysys-ssh --rules=tcp:22 --source-ranges="$cidr" --target-tags=raysys-head
rule raysys-internal --rules=tcp,udp --source-tags=raysys --target-tags=raysys

echo "network $name in $project ($region): SSH from $cidr to the head, all TCP and UDP between the nodes" >&2
