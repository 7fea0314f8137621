#!/bin/sh
# go test -exec wrapper for tests/e2e: runs the test binary in private mount,
# network and PID namespaces, so the node it builds never touches the
# machine: its mounts (the kubelet's fixed /var/lib/kubelet, /run, /var/log)
# vanish with the mount namespace, its bridge, veths and addresses with the
# network namespace, and every process it started, containers included, is
# killed when the namespace's first process (this sh) exits. Needs root.
#
# The namespace has loopback and one veth pair whose end e2e0 carries the
# node's address (10.200.0.1, tests/e2e's nodeIP) and the default route,
# which the kubelet and the API server need to pick their addresses.
set -e
exec unshare --mount --net --pid --fork --mount-proc --propagation private sh -c '
set -e
ip link set lo up
ip link add e2e0 type veth peer name e2e1
ip addr add 10.200.0.1/24 dev e2e0
ip link set e2e1 up
ip link set e2e0 up
ip route add default dev e2e0
sysctl -qw net.ipv4.ip_forward=1
IN_E2E_NS=1 "$@"' sh "$@"
