//! The kernel path, for real: in the VM test bed (see tests/common/vm.rs), rdbd serves a disk
//! that the kernel's NBD client (Debian's nbd-client) attaches as /dev/nbd0, carrying an XFS and
//! a short fio run (tools/vm/smoke.sh).

mod common;

use std::time::Duration;

#[test]
fn kernel_nbd_client_carries_xfs_and_fio_on_rdbd_in_a_vm() {
    common::vm::run_scenario("smoke.sh", Duration::from_secs(150), "smoke passed");
}
