//! Serving a real block device (a loop device over a file), with and without O_DIRECT.
//! Needs root (losetup).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A loop device attached to a file; detached when dropped, even if the test fails.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = run_ok_within(Command::new("losetup").args(["-f", "--show"]).arg(file), TOOL_TIMEOUT);
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(name.starts_with("/dev/loop"), "losetup printed {name:?}");
        LoopDevice { path: PathBuf::from(name) }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("losetup").arg("-d").arg(&self.path).status().is_ok_and(|s| s.success());
            if ok {
                return;
            }
            // Still busy (a server being torn down): retry briefly.
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

fn assert_same_bytes(expected: &[u8], actual: &[u8], what: &str) {
    assert_eq!(expected.len(), actual.len(), "{what}: length differs");
    if expected == actual {
        return;
    }
    if let Some(i) = expected.iter().zip(actual).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}: expected {:#04x}, got {:#04x}", expected[i], actual[i]);
    }
}

/// Unaligned writes, write_zeroes and trims sent straight to the server (libnbd's own alignment
/// checks off), each read back at once, both exactly and through the enclosing 4 KiB-aligned
/// range. Arguments: URI, then "kind:offset:length:byte" per request.
const UNALIGNED: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
for arg in sys.argv[2:]:
    kind, off, length, byte = arg.split(":")
    off, length, byte = int(off), int(length), int(byte)
    data = bytes([byte]) * length
    if kind == "write":
        h.pwrite(data, off)
    elif kind == "zero":
        try:
            h.zero(length, off)
        except nbd.Error as e:
            raise SystemExit("unaligned write_zeroes at %d+%d failed: %s" % (off, length, e))
    else:
        # trim (contents afterwards unspecified), then a write makes them defined again
        try:
            h.trim(length, off)
        except nbd.Error as e:
            raise SystemExit("unaligned trim at %d+%d failed: %s" % (off, length, e))
        h.pwrite(data, off)
    got = h.pread(length, off)
    assert got == data, "unaligned read-back at %d+%d differs" % (off, length)
    start = off // 4096 * 4096
    end = (off + length + 4095) // 4096 * 4096
    got = h.pread(end - start, start)
    assert got[off - start:off - start + length] == data, \
        "aligned read-back of %d..%d misses the write at %d+%d" % (start, end, off, length)
h.flush()
print("unaligned OK")
"#;

/// (request, offset, length, byte) of the unaligned requests, all inside the 64 MiB device, in
/// order; "zero" leaves zeroes, "trim" is followed by a write of `byte`.
const ODD_REQUESTS: [(&str, u64, u64, u8); 10] = [
    ("write", 1, 1, 0x11),
    ("write", 511, 3, 0x22),
    ("write", 4097, 65537, 0x33),
    ("write", MIB - 100, 200, 0x44),
    ("write", 10 * MIB + 513, 1_000_000, 0x55),
    ("write", SIZE - 5, 5, 0x66),
    ("zero", 4097 + 10, 100, 0),
    ("zero", 10 * MIB + 4097, 70_001, 0),
    ("trim", 30 * MIB + 3, 9000, 0x77),
    ("zero", 1, 1, 0),
];

fn odd_request_args() -> Vec<String> {
    ODD_REQUESTS.iter().map(|(k, o, l, b)| format!("{k}:{o}:{l}:{b}")).collect()
}

fn apply_odd_requests(expected: &mut [u8]) {
    for (kind, off, len, byte) in ODD_REQUESTS {
        let fill = if kind == "zero" { 0 } else { byte };
        expected[off as usize..(off + len) as usize].fill(fill);
    }
}

fn serve_loop_device(direct: bool) {
    if !is_root() || !have_tool("losetup") || !have_tool("nbdcopy") || !have_tool("nbdinfo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let backing = work.path().join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(SIZE).unwrap();
    let dev = LoopDevice::attach(&backing);

    let extra: &[&str] = if direct { &["--direct"] } else { &[] };
    let mut server = Server::serve_device(tempfile::tempdir().unwrap(), dev.path.clone(), extra);

    // What the client sees.
    let out = run_ok_within(Command::new("nbdinfo").args(["--json", &server.unix_uri]), TOOL_TIMEOUT);
    let json = Json::parse_tool_output(&out.stdout);
    let e = &json.field("exports").as_array()[0];
    assert_eq!(e.field("export-size").as_u64(), SIZE);
    assert!(!e.field("is_read_only").as_bool());
    assert_eq!(e.field("block_size_minimum").as_u64(), if direct { 512 } else { 1 }, "{e:?}");
    assert_eq!(e.field("block_size_preferred").as_u64(), 4096);

    // Random data in and out.
    let src = work.path().join("src.bin");
    let back = work.path().join("back.bin");
    random_file(&src, SIZE as usize, if direct { 21 } else { 22 });
    run_ok_within(Command::new("nbdcopy").arg(&src).arg(&server.unix_uri), TOOL_TIMEOUT);
    run_ok_within(Command::new("nbdcopy").arg(&server.tcp_uri).arg(&back), TOOL_TIMEOUT);
    let mut expected = std::fs::read(&src).unwrap();
    assert_same_bytes(&expected, &std::fs::read(&back).unwrap(), "nbdcopy round trip");

    if direct {
        // qemu-io honours the advertised 512-byte minimum and aligns requests itself...
        if have_tool("qemu-io") {
            let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
            let qemu_writes = [(0xa1u8, 3u64, 5u64), (0xa2, 4095, 2), (0xa3, 20 * MIB + 7, 70_001)];
            for (p, off, len) in qemu_writes {
                args.extend(["-c".into(), format!("write -P {p:#04x} {off} {len}")]);
                expected[off as usize..(off + len) as usize].fill(p);
            }
            for (p, off, len) in qemu_writes {
                args.extend(["-c".into(), format!("read -P {p:#04x} {off} {len}")]);
            }
            args.push(server.unix_uri.clone());
            let out = output_within(Command::new("qemu-io").args(&args), TOOL_TIMEOUT);
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(!text.contains("Pattern verification failed"), "{text}");
            assert!(out.status.success(), "qemu-io failed:\n{text}");
        }
        // ...so also send unaligned requests straight to the server: they must still work.
        if have_python_nbd() {
            let specs = odd_request_args();
            let mut args = vec![server.unix_uri.as_str()];
            args.extend(specs.iter().map(String::as_str));
            let out = run_ok_within(&mut python_nbd(UNALIGNED, &args), TOOL_TIMEOUT);
            assert!(String::from_utf8_lossy(&out.stdout).contains("unaligned OK"));
            apply_odd_requests(&mut expected);
        }
        // A full read over NBD sees all of it.
        std::fs::remove_file(&back).unwrap();
        run_ok_within(Command::new("nbdcopy").arg(&server.unix_uri).arg(&back), TOOL_TIMEOUT);
        assert_same_bytes(&expected, &std::fs::read(&back).unwrap(), "read back after unaligned writes");
    }

    assert!(server.stop().success(), "log:\n{}", server.log());
    // The data is on the device itself (read with the server gone), and in its backing file.
    assert_same_bytes(&expected, &std::fs::read(&dev.path).unwrap(), "loop device contents");
    drop(dev);
    assert_same_bytes(&expected, &std::fs::read(&backing).unwrap(), "backing file contents");
}

#[test]
fn loop_device_page_cache() {
    serve_loop_device(false);
}

#[test]
fn loop_device_direct_io() {
    serve_loop_device(true);
}

#[test]
fn regular_file_direct_io_unaligned() {
    // The same unaligned-request check on a regular file with O_DIRECT (no root needed).
    if !have_python_nbd() {
        return;
    }
    let mut server = Server::start_with(SIZE, &["--direct"]);
    let specs = odd_request_args();
    let mut args = vec![server.tcp_uri.as_str()];
    args.extend(specs.iter().map(String::as_str));
    let out = run_ok_within(&mut python_nbd(UNALIGNED, &args), TOOL_TIMEOUT);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unaligned OK"));
    assert!(server.stop().success(), "log:\n{}", server.log());
    let mut expected = vec![0u8; SIZE as usize];
    apply_odd_requests(&mut expected);
    assert_same_bytes(&expected, &std::fs::read(&server.file).unwrap(), "backing file contents");
}
