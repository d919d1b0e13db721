# Two machines inside one VM (sourced by a scenario): each node is a network namespace, joined to
# the others by a veth in bridge br0 of the root namespace (where the NFS client lives), and a
# mount namespace of its own (its own /run, /srv, /var/lib/nfs and /etc/lvm), so that each runs
# its own rdbd, LVM view (only its own /dev/nbdX) and kernel NFS server, as two hosts would.
# The block devices and device-mapper names are the one kernel's: only one node at a time may
# have the volume group active.

NODES_DIR=/run/vm-nodes
SUBNET=10.99.0
CLIENT_IP=$SUBNET.254
EXPORT_DIR=/srv/export
# The VM's console ports are open in every process; LVM would warn about them on each command.
export LVM_SUPPRESS_FD_WARNINGS=1

# Runs a command on NODE: in its network and mount namespaces.
on() {
  local node=$1
  shift
  nsenter --mount="$NODES_DIR/$node.mnt" --net="/run/netns/$node" -- "$@"
}

# rdbd VERB NODE [ARGS]: `rdbd VERB r0 --node NODE ARGS` on NODE.
rdbd() { on "$2" "$RDBD" "$1" r0 --node "$2" "${@:3}"; }
# status_field NODE PY-EXPR: one field of NODE's `status --json`, e.g. "['role']".
status_field() { rdbd status "$1" --json | /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)$2)"; }
# wait_for NODE PY-EXPR VALUE [SECONDS]: poll status until the field has the value.
wait_for() {
  local deadline=$((SECONDS + ${4:-30}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    [ "$(status_field "$1" "$2" 2>/dev/null)" = "$3" ] && return 0
    sleep 0.2
  done
  echo "$1: status$2 is $(status_field "$1" "$2" 2>&1), not $3, after ${4:-30} s" >&2
  return 1
}

# The bridge and the client's address; once, before the nodes.
nodes_init() {
  mkdir -p "$NODES_DIR"
  # A mount namespace is kept by bind-mounting it onto a file, which must be on a private mount.
  mount --bind "$NODES_DIR" "$NODES_DIR"
  mount --make-private "$NODES_DIR"
  ip link add br0 type bridge
  ip addr add "$CLIENT_IP/24" dev br0
  ip link set br0 up
  ip link set lo up
}

# host_create NAME IP: a network namespace at IP on the bridge (its eth0).
host_create() {
  local name=$1 ip=$2
  ip netns add "$name"
  ip link add "veth-$name" type veth peer name eth0 netns "$name"
  ip link set "veth-$name" master br0 up
  ip -n "$name" addr add "$ip/24" dev eth0
  ip -n "$name" link set eth0 up
  ip -n "$name" link set lo up
}

# node_create NAME IP NBD_DEVICE: a node at IP on the bridge, whose LVM sees only NBD_DEVICE.
node_create() {
  local name=$1 ip=$2 dev=$3
  host_create "$name" "$ip"
  touch "$NODES_DIR/$name.mnt"
  # The node's /run is $NODES_DIR/NAME.run of the root namespace, where its logs can be read.
  mkdir -p "$NODES_DIR/$name.run"
  unshare --mount="$NODES_DIR/$name.mnt" --propagation slave bash -Eeu -c '
    mount --bind "$2" /run
    for d in /srv /var/lib/nfs /etc/lvm; do mount -t tmpfs "node-$0" "$d"; done
    mkdir -p /run/rdbd /run/lock/lvm /run/lvm /srv/export
    mkdir -p /var/lib/nfs/v4recovery /var/lib/nfs/sm /var/lib/nfs/sm.bak
    touch /var/lib/nfs/etab /var/lib/nfs/rmtab
    cat > /etc/lvm/lvm.conf <<EOF
devices {
  filter = [ "a|^$1\$|", "r|.*|" ]
  global_filter = [ "a|^$1\$|", "r|.*|" ]
  obtain_device_list_from_udev = 0
  use_devicesfile = 0
}
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 event_activation = 0 }
backup { backup = 0 archive = 0 }
EOF
  ' "$name" "$dev" "$NODES_DIR/$name.run"
}

# The modules the stack needs, the bridge, and nodes alpha at ALPHA (/dev/nbd0) and beta at BETA
# (/dev/nbd1).
nodes_pair_up() {
  run modprobe -a nbd dm-mod xfs nfsd veth bridge
  run modprobe nbd nbds_max=4
  for _ in $(seq 50); do [ -b /dev/nbd1 ] && break; sleep 0.1; done
  nodes_init
  node_create alpha "$1" /dev/nbd0
  node_create beta "$2" /dev/nbd1
}

# The size of NODE's last resync in MiB.
resynced_mib() { echo $(($(status_field "$1" "['last_resync_bytes']") >> 20)); }

# At the end of a scenario, whatever happened: the client's mount gone, both daemons down.
nodes_down() {
  umount -f -l /mnt 2>/dev/null || true
  local n
  for n in alpha beta; do
    [ -e "$NODES_DIR/$n.mnt" ] || continue
    on "$n" "$RDBD" down r0 --node "$n" >/dev/null 2>&1 || true
  done
}

# Cuts NODE off the network (both its peer and the client), as a pulled cable would, and mends it.
link_cut() { ip link set "veth-$1" down; }
link_mend() { ip link set "veth-$1" up; }

# The kernel NFS server of NODE exports $EXPORT_DIR to the client (NFSv3, sync writes, fsid 1 so
# that both nodes hand out the same file handles).
nfs_start() {
  local node=$1
  on "$node" mount -t nfsd nfsd /proc/fs/nfsd
  on "$node" rpcbind -w
  on "$node" rpc.mountd
  on "$node" rpc.nfsd 4
  on "$node" exportfs -o rw,sync,no_root_squash,fsid=1 "$CLIENT_IP:$EXPORT_DIR"
}

# Stops NODE's NFS server: unexport, no nfsd threads, its rpcbind and mountd ended.
nfs_stop() {
  local node=$1 pid
  on "$node" exportfs -ua
  on "$node" exportfs -f
  on "$node" rpc.nfsd 0
  for pid in $(ip netns pids "$node"); do
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in rpcbind | rpc.mountd) kill "$pid" ;; esac
  done
  on "$node" umount /proc/fs/nfsd
}

# The storage stack on NODE's /dev/nbdX: activate the volume group, mount the XFS, export it.
stack_up() {
  local node=$1
  on "$node" vgchange -ay vg0
  on "$node" mount -t xfs /dev/vg0/lv0 "$EXPORT_DIR"
  nfs_start "$node"
}

# And down again, in reverse.
stack_down() {
  local node=$1
  nfs_stop "$node"
  on "$node" umount "$EXPORT_DIR"
  on "$node" vgchange -an vg0
}

# Fences a node whose daemon died, as a cluster's STONITH would power it off: its /dev/nbdX is
# disconnected (the I/O waiting for a new daemon fails, so XFS shuts down), its stack taken down.
# The volume group cannot be read any more: its mapping is removed by name.
fence() {
  local node=$1 dev=$2
  nbd-client -d "$dev"
  nfs_stop "$node"
  on "$node" umount "$EXPORT_DIR"
  on "$node" dmsetup remove vg0-lv0
}
