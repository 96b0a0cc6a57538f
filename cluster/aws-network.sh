#!/usr/bin/env bash
# The security group every node of cluster.yaml runs in, made once per account and region with your own AWS
# credentials (README, "On a cluster", step 2). It admits SSH (22) from the range you give and nothing else from
# outside, and every TCP and UDP port between its own members: the GCS, the raylets, object transfers, workers,
# metrics and the DDP ranks' NCCL all listen on ports of their own choosing.
#
# Why a group of your own: when a node type names none, `ray up` creates `ray-autoscaler-<cluster>` and opens SSH
# from 0.0.0.0/0 on it whatever the config asks for (the config's rules are added beside that one). When every node
# type names its groups in SecurityGroupIds, Ray creates no group and adds no rule.
#
#   cluster/aws-network.sh 203.0.113.7/32               # your address: curl -s https://checkip.amazonaws.com
#   cluster/aws-network.sh 203.0.113.0/24 eu-west-1     # another region: provider.region in cluster.yaml too
#   VPC_ID=vpc-0abc cluster/aws-network.sh 203.0.113.7/32   # not the default VPC (its subnets must give
#                                                            # instances a public address)
#
# It prints the group's id (stdout) and the line that puts it in cluster.yaml (stderr). Run again, it adds only
# what is missing; a new range is added beside the old one (`aws ec2 revoke-security-group-ingress` removes that).
# 0.0.0.0/0 (any /0) is refused unless --force comes first.
set -euo pipefail

usage() {
  echo "usage: $0 [--force] CIDR [REGION]   CIDR: where SSH may come from, e.g. 203.0.113.7/32" >&2
  exit 2
}

source "$(dirname "$0")/ssh-range.sh"

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
[ $# -ge 1 ] && [ $# -le 2 ] || usage
cidr=$1 region=${2:-us-west-2} name=raysys
check_ssh_range "$cidr" "$force"

ec2() { aws ec2 --region "$region" "$@"; }

vpc=${VPC_ID:-$(ec2 describe-vpcs --filters Name=isDefault,Values=true --query 'Vpcs[0].VpcId' --output text)}
if [ -z "$vpc" ] || [ "$vpc" = None ]; then
  echo "$0: no default VPC in $region; set VPC_ID to the VPC the cluster runs in" >&2
  exit 1
fi

sg=$(ec2 describe-security-groups --filters Name=vpc-id,Values="$vpc" Name=group-name,Values="$name" \
  --query 'SecurityGroups[0].GroupId' --output text)
if [ -z "$sg" ] || [ "$sg" = None ]; then
  sg=$(ec2 create-security-group --vpc-id "$vpc" --group-name "$name" \
    --description "raysys cluster: SSH from one range, all TCP and UDP between members" \
    --query GroupId --output text)
fi

# One inbound rule; a rule the group already has is not an error (the script runs again unchanged).
allow() {
  local err
  if ! err=$(ec2 authorize-security-group-ingress --group-id "$sg" "$@" 2>&1 >/dev/null); then
    grep -q InvalidPermission.Duplicate <<<"$err" || { echo "$err" >&2; exit 1; }
  fi
}
allow --protocol tcp --port 22 --cidr "$cidr"
allow --protocol tcp --port 0-65535 --source-group "$sg"
allow --protocol udp --port 0-65535 --source-group "$sg"

echo "$sg"
echo "$name ($sg, $vpc, $region): SSH from $cidr, all TCP and UDP between its members. For cluster.yaml:" >&2
echo "  sed -i 's/sg-REPLACE_ME/$sg/g' cluster.yaml" >&2
