# Sourced by cluster/aws-network.sh and cluster/gcp-network.sh: the one check of the range SSH may come from.
# check_ssh_range CIDR FORCE exits 2 for what is not an IPv4 range, and for any /0 unless FORCE is 1.

valid_cidr() {
  [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})/([0-9]{1,2})$ ]] || return 1
  local i
  for i in 1 2 3 4; do ((10#${BASH_REMATCH[i]} <= 255)) || return 1; done
  ((10#${BASH_REMATCH[5]} <= 32))
}

check_ssh_range() {
  valid_cidr "$1" || { echo "$0: '$1' is not an IPv4 range like 203.0.113.7/32" >&2; exit 2; }
  if ((10#${1#*/} == 0 && !$2)); then
    echo "$0: $1 would admit SSH from the whole internet; give your own range, or --force first" >&2
    exit 2
  fi
}
