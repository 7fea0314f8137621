#!/bin/sh
# go test -exec wrapper: runs the test binary in a private mount namespace
# with a tmpfs over /var/lib/kubelet, because the real device manager
# hard-codes /var/lib/kubelet/device-plugins/kubelet.sock and deletes every
# socket in that directory when it starts. Nothing reaches the host's
# directory; the mount vanishes with the process. Needs root (CAP_SYS_ADMIN).
set -e
mkdir -p /var/lib/kubelet
exec unshare --mount sh -c 'mount -t tmpfs tmpfs /var/lib/kubelet && IN_KUBELET_NS=1 exec "$@"' sh "$@"
