# The NFS client of the VM scenarios (sourced; it lives in the root namespace): files are
# written from $WORK/src with fsync, and a name is added to $WORK/acked only once its fsync
# returned: those are the acknowledged writes, which must survive whatever happens after.
# Expects lib.sh (run) and nodes.sh (EXPORT_DIR); sets CLIENT_MNT.

CLIENT_MNT=/mnt
mkdir -p "$WORK/src"
: > "$WORK/acked"

# client_mount SERVER: NFSv3 over TCP, hard (requests wait for a server), short retransmits.
client_mount() {
  run mount -t nfs -o vers=3,nolock,tcp,hard,timeo=20,retrans=3 "$1:$EXPORT_DIR" "$CLIENT_MNT"
}
# client_write PREFIX COUNT: COUNT files of 128 KiB, stopping at the first failure.
client_write() {
  local i
  for i in $(seq "$2"); do
    head -c 128K /dev/urandom > "$WORK/src/$1$i"
    dd if="$WORK/src/$1$i" of="$CLIENT_MNT/$1$i" bs=128K conv=fsync status=none 2>/dev/null || return 0
    echo "$1$i" >> "$WORK/acked"
  done
}
acked_count() { wc -l < "$WORK/acked"; }
# wait_acked N [SECONDS]: until N more files than now are acknowledged.
wait_acked() {
  local limit=${2:-60}
  local target=$(($(acked_count) + $1)) deadline=$((SECONDS + limit))
  while [ "$(acked_count)" -lt "$target" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "fewer than $target files acknowledged after $limit s" >&2; return 1; }
    sleep 0.2
  done
}
# Every acknowledged file reads back as written, through the NFS mount.
client_check() {
  local f bad=0
  while read -r f; do
    cmp -s "$WORK/src/$f" "$CLIENT_MNT/$f" || { echo "    $f differs or is missing" >&2; bad=1; }
  done < "$WORK/acked"
  [ "$bad" = 0 ]
  echo "    all $(acked_count) acknowledged files intact"
}
# The writer's NFS requests hang while no server answers; a forced unmount ends them.
client_abandon() {
  umount -f -l "$CLIENT_MNT"
  echo "+ wait for the writer"
  wait "$writer" # (not through run: a pipeline is no parent of it)
}
