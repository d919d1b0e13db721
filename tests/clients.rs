//! Real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh and python bindings, qemu-io/qemu-img, fio)
//! against a real `rdbd serve` process, checking what they observe.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for any single client run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts two files have the same length and bytes, naming the first differing offset.
fn assert_same_contents(expected: &Path, actual: &Path) {
    let a = std::fs::read(expected).unwrap();
    let b = std::fs::read(actual).unwrap();
    assert_eq!(a.len(), b.len(), "{} and {} differ in length", expected.display(), actual.display());
    if a == b {
        return;
    }
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{} and {} differ first at byte {i}: expected {:#04x}, got {:#04x}",
            expected.display(),
            actual.display(),
            a[i],
            b[i]
        );
    }
}

/// How many connections the server has accepted so far (from its log).
fn connections_logged(server: &Server) -> usize {
    server.log().matches("client connected").count()
}

// ---------------------------------------------------------------------------------------------
// nbdinfo: what the handshake advertises
// ---------------------------------------------------------------------------------------------

fn assert_writable_export(e: &Json, size: u64, name: &str, description: &str) {
    assert_eq!(e.field("export-name").as_str(), name);
    assert_eq!(e.field("description").as_str(), description);
    assert_eq!(e.field("export-size").as_u64(), size);
    assert!(!e.field("is_read_only").as_bool(), "writable export reported read-only: {e:?}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_df",
        "can_cache",
    ] {
        assert!(e.field(flag).as_bool(), "{flag} should be true: {e:?}");
    }
    assert_eq!(e.field("block_size_minimum").as_u64(), 1);
    assert_eq!(e.field("block_size_preferred").as_u64(), 4096);
    assert_eq!(e.field("block_size_maximum").as_u64(), 32 * MIB);
    let contexts: Vec<&str> = e.field("contexts").as_array().iter().map(Json::as_str).collect();
    assert!(contexts.contains(&"base:allocation"), "no base:allocation context: {contexts:?}");
}

#[test]
fn nbdinfo_json_reports_size_name_description_flags_and_block_sizes() {
    if !have_tool("nbdinfo") {
        return;
    }
    let size = 48 * MIB + 4096;
    let mut server = Server::start_with(size, &["--export", "disk1", "--description", "rdbd test disk"]);
    // By name and by the default name "", over both transports.
    let uris = [
        server.unix_uri_for("disk1"),
        server.unix_uri.clone(),
        format!("{}disk1", server.tcp_uri),
        server.tcp_uri.clone(),
    ];
    for uri in &uris {
        let out = run_ok_within(Command::new("nbdinfo").args(["--json", uri]), TOOL_TIMEOUT);
        let json = Json::parse_tool_output(&out.stdout);
        assert!(json.field("structured").as_bool(), "{uri}: structured replies not negotiated");
        let exports = json.field("exports").as_array();
        assert_eq!(exports.len(), 1, "{uri}: {json:?}");
        assert_writable_export(&exports[0], size, "disk1", "rdbd test disk");
    }
    // An unknown export name is refused.
    let out = output_within(
        Command::new("nbdinfo").args(["--json", &server.unix_uri_for("no-such-export")]),
        TOOL_TIMEOUT,
    );
    assert!(!out.status.success(), "unknown export accepted: {}", stdout_of(&out));
    assert!(server.stop().success(), "log:\n{}", server.log());
}

#[test]
fn nbdinfo_list_shows_export_name_and_description() {
    if !have_tool("nbdinfo") {
        return;
    }
    let size = 16 * MIB;
    let mut server = Server::start_with(size, &["--export", "listed", "--description", "the only export"]);
    for uri in [&server.unix_uri, &server.tcp_uri] {
        let out = run_ok_within(Command::new("nbdinfo").args(["--list", "--json", uri]), TOOL_TIMEOUT);
        let json = Json::parse_tool_output(&out.stdout);
        let exports = json.field("exports").as_array();
        assert_eq!(exports.len(), 1, "{uri}: {json:?}");
        assert_writable_export(&exports[0], size, "listed", "the only export");
    }
    // The plain (non-JSON) listing also names it.
    let out = run_ok_within(Command::new("nbdinfo").args(["--list", &server.unix_uri]), TOOL_TIMEOUT);
    let text = stdout_of(&out);
    assert!(text.contains("listed") && text.contains("the only export"), "{text}");
    assert!(server.stop().success(), "log:\n{}", server.log());
}

#[test]
fn nbdinfo_read_only_export() {
    if !have_tool("nbdinfo") {
        return;
    }
    let mut server = Server::start_with(8 * MIB, &["--read-only"]);
    let out = run_ok_within(Command::new("nbdinfo").args(["--json", &server.unix_uri]), TOOL_TIMEOUT);
    let json = Json::parse_tool_output(&out.stdout);
    let e = &json.field("exports").as_array()[0];
    assert!(e.field("is_read_only").as_bool(), "{e:?}");
    assert!(!e.field("can_trim").as_bool(), "read-only export offers trim: {e:?}");
    assert!(!e.field("can_zero").as_bool(), "read-only export offers write_zeroes: {e:?}");
    assert!(!e.field("can_fast_zero").as_bool(), "read-only export offers fast zero: {e:?}");
    assert_eq!(e.field("export-size").as_u64(), 8 * MIB);
    assert!(server.stop().success(), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// nbdcopy: bulk data in and out
// ---------------------------------------------------------------------------------------------

#[test]
fn nbdcopy_roundtrip_over_unix_and_tcp() {
    if !have_tool("nbdcopy") {
        return;
    }
    // An odd size, so the tail is not a whole block.
    let size = 24 * MIB + 4097;
    let mut server = Server::start(size);
    let work = tempfile::tempdir().unwrap();
    let (src, back) = (work.path().join("src.bin"), work.path().join("back.bin"));

    // In and out over the unix socket.
    random_file(&src, size as usize, 1);
    run_ok_within(Command::new("nbdcopy").arg(&src).arg(&server.unix_uri), TOOL_TIMEOUT);
    run_ok_within(Command::new("nbdcopy").arg(&server.unix_uri).arg(&back), TOOL_TIMEOUT);
    assert_same_contents(&src, &back);
    assert_same_contents(&src, &server.file);

    // New data in over TCP, out over TCP, and cross-checked over the unix socket.
    random_file(&src, size as usize, 2);
    run_ok_within(Command::new("nbdcopy").arg(&src).arg(&server.tcp_uri), TOOL_TIMEOUT);
    std::fs::remove_file(&back).unwrap();
    run_ok_within(Command::new("nbdcopy").arg(&server.tcp_uri).arg(&back), TOOL_TIMEOUT);
    assert_same_contents(&src, &back);
    std::fs::remove_file(&back).unwrap();
    run_ok_within(Command::new("nbdcopy").arg(&server.unix_uri).arg(&back), TOOL_TIMEOUT);
    assert_same_contents(&src, &back);
    assert!(server.stop().success(), "log:\n{}", server.log());
}

#[test]
fn nbdcopy_multi_conn_roundtrip() {
    if !have_tool("nbdcopy") {
        return;
    }
    let size = 24 * MIB;
    let mut server = Server::start(size);
    let work = tempfile::tempdir().unwrap();
    let (src, back) = (work.path().join("src.bin"), work.path().join("back.bin"));
    random_file(&src, size as usize, 3);

    // nbdcopy caps connections at its thread count, so ask for 4 threads too.
    let before = connections_logged(&server);
    run_ok_within(
        Command::new("nbdcopy")
            .args(["--connections", "4", "--threads", "4"])
            .arg(&src)
            .arg(&server.unix_uri),
        TOOL_TIMEOUT,
    );
    let used = connections_logged(&server) - before;
    assert!(used >= 4, "nbdcopy --connections 4 used only {used} connections (multi-conn not used?)");

    let before = connections_logged(&server);
    run_ok_within(
        Command::new("nbdcopy")
            .args(["--connections", "4", "--threads", "4"])
            .arg(&server.tcp_uri)
            .arg(&back),
        TOOL_TIMEOUT,
    );
    let used = connections_logged(&server) - before;
    assert!(used >= 4, "nbdcopy --connections 4 used only {used} connections reading back");
    assert_same_contents(&src, &back);
    assert_same_contents(&src, &server.file);
    assert!(server.stop().success(), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// qemu-io / qemu-img: unaligned requests and image comparison
// ---------------------------------------------------------------------------------------------

/// (pattern, offset, length): odd offsets and lengths, crossing block boundaries.
const QEMU_WRITES: [(u8, u64, u64); 7] = [
    (0x11, 1, 1),
    (0x22, 511, 3),
    (0x33, 4097, 65537),
    (0x44, 1_000_003, 3),
    (0x55, 2 * MIB - 1, 2),
    (0x66, 3 * MIB + 12345, 131_071),
    (0x77, 8 * MIB - 7, 7), // up to the very last byte
];

#[test]
fn qemu_io_odd_offsets_and_qemu_img_compare() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    let size = 8 * MIB;
    let mut server = Server::start(size);

    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    let mut expected = vec![0u8; size as usize];
    for (p, off, len) in QEMU_WRITES {
        args.extend(["-c".into(), format!("write -P {p:#04x} {off} {len}")]);
        expected[off as usize..(off + len) as usize].fill(p);
    }
    for (p, off, len) in QEMU_WRITES {
        args.extend(["-c".into(), format!("read -P {p:#04x} {off} {len}")]);
    }
    // Untouched gaps between the writes must read back as zeroes.
    let mut zero_reads = 0;
    let mut pos = 0u64;
    let mut sorted = QEMU_WRITES.to_vec();
    sorted.sort_by_key(|w| w.1);
    for (_, off, len) in sorted.iter().copied().chain([(0, size, 0)]) {
        if off > pos {
            args.extend(["-c".into(), format!("read -P 0 {pos} {}", off - pos)]);
            zero_reads += 1;
        }
        pos = pos.max(off + len);
    }
    args.push(server.unix_uri.clone());
    let out = output_within(Command::new("qemu-io").args(&args), TOOL_TIMEOUT);
    let text = format!("{}{}", stdout_of(&out), stderr_of(&out));
    assert!(!text.contains("Pattern verification failed"), "qemu-io saw wrong data:\n{text}");
    assert!(out.status.success(), "qemu-io failed ({}):\n{text}", out.status);
    assert_eq!(text.matches("wrote ").count(), QEMU_WRITES.len(), "{text}");
    assert_eq!(text.matches("read ").count(), QEMU_WRITES.len() + zero_reads, "{text}");

    // The backing file holds exactly those bytes.
    assert_eq!(std::fs::read(&server.file).unwrap(), expected, "backing file differs from the writes");

    // Negative control: a wrong pattern is noticed, so the checks above are meaningful.
    let out = output_within(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x99 4097 16", &server.unix_uri]),
        TOOL_TIMEOUT,
    );
    let text = format!("{}{}", stdout_of(&out), stderr_of(&out));
    assert!(text.contains("Pattern verification failed"), "wrong pattern not detected:\n{text}");
    assert!(!out.status.success());

    // qemu-img compare: identical to a local raw file with the same data (both URI syntaxes)...
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("local.raw");
    std::fs::write(&local, &expected).unwrap();
    let legacy_uri = format!("nbd:unix:{}", server.socket.display());
    for uri in [&server.unix_uri, &legacy_uri, &server.tcp_uri] {
        let out = output_within(
            Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri]).arg(&local),
            TOOL_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "qemu-img compare {uri} vs identical file:\n{}{}",
            stdout_of(&out),
            stderr_of(&out)
        );
    }
    // ...and different (exit 1) once one byte of the local file changes.
    expected[5 * MIB as usize + 3] = 0xEE;
    std::fs::write(&local, &expected).unwrap();
    for uri in [&server.unix_uri, &legacy_uri] {
        let out = output_within(
            Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri]).arg(&local),
            TOOL_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "qemu-img compare {uri} vs different file:\n{}{}",
            stdout_of(&out),
            stderr_of(&out)
        );
        assert!(stdout_of(&out).contains("Content mismatch"), "{}", stdout_of(&out));
    }
    assert!(server.stop().success(), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// fio: concurrent verified I/O over several connections
// ---------------------------------------------------------------------------------------------

const FIO_JOBS: u64 = 4;
const FIO_PER_JOB: u64 = 8 * MIB;

fn fio(server: &Server, workdir: &Path, rw: &str, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("fio");
    cmd.current_dir(workdir)
        .arg("--name=rdbd")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.unix_uri))
        .arg(format!("--rw={rw}"))
        .arg("--bs=4k")
        .arg(format!("--size={FIO_PER_JOB}"))
        .arg(format!("--numjobs={FIO_JOBS}"))
        .arg(format!("--offset_increment={FIO_PER_JOB}"))
        .arg("--iodepth=16")
        .arg("--verify=crc32c")
        .arg("--verify_state_save=0")
        .arg("--output-format=json")
        .args(extra);
    output_within(&mut cmd, TOOL_TIMEOUT)
}

/// Per-job (error, read bytes, write bytes) from fio's JSON report.
fn fio_jobs(out: &std::process::Output) -> Vec<(u64, u64, u64)> {
    let json = Json::parse_tool_output(&out.stdout);
    json.field("jobs")
        .as_array()
        .iter()
        .map(|j| {
            (
                j.field("error").as_u64(),
                j.field("read").field("io_bytes").as_u64(),
                j.field("write").field("io_bytes").as_u64(),
            )
        })
        .collect()
}

#[test]
fn fio_four_connections_randwrite_then_verify() {
    if !have_tool("fio") {
        return;
    }
    let mut server = Server::start(FIO_JOBS * FIO_PER_JOB);
    let work = tempfile::tempdir().unwrap();

    // Pass 1: four jobs (four connections), disjoint regions, random writes then verify.
    let before = connections_logged(&server);
    let out = fio(&server, work.path(), "randwrite", &["--do_verify=1"]);
    assert!(out.status.success(), "fio write pass failed:\n{}{}", stdout_of(&out), stderr_of(&out));
    assert!(connections_logged(&server) - before >= FIO_JOBS as usize, "fio did not use 4 connections");
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), FIO_JOBS as usize);
    for (i, (error, read, written)) in jobs.into_iter().enumerate() {
        assert_eq!(error, 0, "job {i} reported an error:\n{}", stderr_of(&out));
        assert_eq!(written, FIO_PER_JOB, "job {i} wrote {written} bytes");
        assert_eq!(read, FIO_PER_JOB, "job {i} verified {read} bytes");
    }

    // Pass 2: a fresh fio reads every block back and checks its crc32c header.
    let out = fio(&server, work.path(), "read", &[]);
    assert!(out.status.success(), "fio verify pass failed:\n{}{}", stdout_of(&out), stderr_of(&out));
    for (i, (error, read, _)) in fio_jobs(&out).into_iter().enumerate() {
        assert_eq!(error, 0, "verify job {i} reported an error:\n{}", stderr_of(&out));
        assert_eq!(read, FIO_PER_JOB, "verify job {i} read {read} bytes");
    }

    // Negative control: corrupt one block of job 2's region behind the server's back; the
    // verify pass must now fail, so the passes above really checked the data.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&server.file).unwrap();
        f.write_all_at(b"CORRUPT!", 2 * FIO_PER_JOB + 5 * 4096 + 100).unwrap();
    }
    let out = fio(&server, work.path(), "read", &[]);
    assert!(!out.status.success(), "fio did not notice a corrupted block");
    assert!(
        stderr_of(&out).contains("verify failed") || fio_jobs(&out).iter().any(|j| j.0 != 0),
        "{}",
        stderr_of(&out)
    );
    assert!(server.stop().success(), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// nbdsh / python libnbd: FUA, flush, zero, trim, block status, errors
// ---------------------------------------------------------------------------------------------

#[test]
fn fua_write_and_flush_reach_the_backing_file() {
    if !have_tool("nbdsh") || !have_python_nbd() {
        return;
    }
    let mut server = Server::start(4 * MIB);
    let script = r#"
assert h.can_fua() and h.can_flush()
h.pwrite(b"\xa5" * 4096, 12345, nbd.CMD_FLAG_FUA)
h.pwrite(b"plain write, then flush", 3 * 1024 * 1024 + 1)
h.flush()
h.zero(1000, 600000, nbd.CMD_FLAG_FUA)
h.set_strict_mode(0)  # libnbd itself refuses FUA on reads; the server must accept it
assert h.pread(10, 12345, nbd.CMD_FLAG_FUA) == b"\xa5" * 10
print("nbdsh done")
"#;
    // Put non-zero bytes where the FUA zero goes, so it has something to clear.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&server.file).unwrap();
        f.write_all_at(&[0xffu8; 2000], 599_500).unwrap();
    }
    for uri in [&server.unix_uri, &server.tcp_uri] {
        let out = run_ok_within(nbdsh().args(["-u", uri, "-c", script]), TOOL_TIMEOUT);
        assert!(stdout_of(&out).contains("nbdsh done"), "{}", stdout_of(&out));
    }
    let disk = std::fs::read(&server.file).unwrap();
    assert!(disk[12345..12345 + 4096].iter().all(|&b| b == 0xa5), "FUA write not in the file");
    assert_eq!(disk[12344], 0);
    assert_eq!(disk[12345 + 4096], 0);
    let at = 3 * MIB as usize + 1;
    assert_eq!(&disk[at..at + 23], b"plain write, then flush", "flushed write not in the file");
    assert!(disk[599_500..600_000].iter().all(|&b| b == 0xff), "zero spilled before its range");
    assert!(disk[600_000..601_000].iter().all(|&b| b == 0), "FUA zero not in the file");
    assert!(disk[601_000..601_500].iter().all(|&b| b == 0xff), "zero spilled after its range");
    assert!(server.stop().success(), "log:\n{}", server.log());
}

const ZERO_TRIM_STATUS: &str = r#"
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
M = 1024 * 1024
size = h.get_size()
assert h.can_zero() and h.can_trim() and h.can_fast_zero()
assert h.can_meta_context("base:allocation")

# write_zeroes in the middle of written data
h.pwrite(b"\xab" * M, M)
h.zero(65536, M + 4096)
got = h.pread(M, M)
assert got[:4096] == b"\xab" * 4096, "data before the zeroed range changed"
assert got[4096:4096 + 65536] == bytes(65536), "zeroed range does not read as zeroes"
assert got[4096 + 65536:] == b"\xab" * (M - 4096 - 65536), "data after the zeroed range changed"

# odd-sized zero, and zero with NO_HOLE
h.zero(3, M + 200000)
assert h.pread(5, M + 199999) == b"\xab\x00\x00\x00\xab"
h.zero(4096, M + 300000, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4098, M + 299999) == b"\xab" + bytes(4096) + b"\xab"

# FAST_ZERO: either zeroes quickly or fails with ENOTSUP, never anything else
h.pwrite(b"\xcd" * 8192, 6 * M)
try:
    h.zero(8192, 6 * M, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(8192, 6 * M) == bytes(8192), "fast zero did not zero"
except nbd.Error as e:
    assert e.errno == "ENOTSUP", "fast zero failed with %s" % e.errno

# trim: succeeds; the data around it is untouched (trimmed contents are unspecified)
h.trim(256 * 1024, M + 512 * 1024)
got = h.pread(M, M)
assert got[:4096] == b"\xab" * 4096
assert got[768 * 1024:] == b"\xab" * (256 * 1024)

# a big trim and zero (more than the 32 MiB maximum payload is allowed for these)
h.trim(size - 8 * M, 8 * M)

h.pwrite(b"\x42" * 65536, 4 * M)
h.flush()
extents = []
def cb(metacontext, offset, entries, err):
    if metacontext == "base:allocation":
        extents.extend(zip(entries[0::2], entries[1::2]))
    return 0
pos = 0
while pos < size:
    before = len(extents)
    h.block_status(size - pos, pos, cb)
    assert len(extents) > before, "no extents at %d" % pos
    pos += sum(length for length, _ in extents[before:])
print(json.dumps(extents))
"#;

/// Flags of the extent covering `offset`, from (length, flags) pairs starting at 0.
fn flags_at(extents: &[(u64, u64)], offset: u64) -> u64 {
    let mut pos = 0;
    for &(len, flags) in extents {
        if offset < pos + len {
            return flags;
        }
        pos += len;
    }
    panic!("offset {offset} not covered by {extents:?}");
}

#[test]
fn write_zeroes_trim_and_block_status() {
    if !have_python_nbd() {
        return;
    }
    let size = 64 * MIB;
    let mut server = Server::start(size);
    let out = run_ok_within(&mut python_nbd(ZERO_TRIM_STATUS, &[&server.unix_uri]), TOOL_TIMEOUT);
    let json = Json::parse(stdout_of(&out).trim());
    let extents: Vec<(u64, u64)> = json
        .as_array()
        .iter()
        .map(|pair| (pair.as_array()[0].as_u64(), pair.as_array()[1].as_u64()))
        .collect();
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), size, "extents do not cover the export");
    const HOLE_ZERO: u64 = 3;
    // Never written: holes that read as zeroes.
    for off in [0, MIB - 1, 10 * MIB, 40 * MIB] {
        assert_eq!(flags_at(&extents, off), HOLE_ZERO, "offset {off} never written: {extents:?}");
    }
    // Written data is reported as data (no hole flag).
    for off in [MIB, MIB + 4095, 4 * MIB, 4 * MIB + 65535] {
        assert_eq!(flags_at(&extents, off) & 1, 0, "offset {off} holds data: {extents:?}");
    }

    // nbdinfo --map agrees.
    if have_tool("nbdinfo") {
        let out =
            run_ok_within(Command::new("nbdinfo").args(["--map", "--json", &server.unix_uri]), TOOL_TIMEOUT);
        let map = Json::parse(stdout_of(&out).trim());
        let mut pos = 0;
        let mut map_extents = Vec::new();
        for e in map.as_array() {
            assert_eq!(e.field("offset").as_u64(), pos, "map is not contiguous: {map:?}");
            let len = e.field("length").as_u64();
            map_extents.push((len, e.field("type").as_u64()));
            pos += len;
        }
        assert_eq!(pos, size);
        assert_eq!(flags_at(&map_extents, 0), HOLE_ZERO);
        assert_eq!(flags_at(&map_extents, 4 * MIB) & 1, 0, "{map:?}");
        assert_eq!(flags_at(&map_extents, 40 * MIB), HOLE_ZERO);
    }
    assert!(server.stop().success(), "log:\n{}", server.log());
}

/// Runs `calls` (python expressions on handle `h`) with client-side checks off, so the server
/// sees the requests; prints "name errno" per call ("name OK" on success).
const ERRORS: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # let bad requests reach the server
h.connect_uri(sys.argv[1])
size = h.get_size()
calls = [
    ("write_straddling_end", lambda: h.pwrite(b"x" * 10, size - 5)),
    ("write_at_end", lambda: h.pwrite(b"x", size)),
    ("write_far_past_end", lambda: h.pwrite(b"x" * 512, size + (1 << 30))),
    ("read_straddling_end", lambda: h.pread(10, size - 5)),
    ("read_at_end", lambda: h.pread(1, size)),
    ("read_unknown_flag", lambda: h.pread(1, 0, 1 << 7)),
    ("trim_past_end", lambda: h.trim(4096, size)),
    ("zero_past_end", lambda: h.zero(4096, size)),
    ("read_after_errors", lambda: h.pread(4096, 0)),
    ("write_after_errors", lambda: h.pwrite(b"y" * 4096, size - 4096)),
]
for name, call in calls:
    try:
        call()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno)
"#;

const READ_ONLY_ERRORS: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # libnbd would refuse writes to a read-only export itself
h.connect_uri(sys.argv[1])
calls = [
    ("write", lambda: h.pwrite(b"x" * 4096, 0)),
    ("write_fua", lambda: h.pwrite(b"x", 100, nbd.CMD_FLAG_FUA)),
    ("zero", lambda: h.zero(4096, 0)),
    ("trim", lambda: h.trim(4096, 0)),
    ("read", lambda: h.pread(4096, 0)),
    ("flush", lambda: h.flush()),
]
for name, call in calls:
    try:
        call()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno)
"#;

fn outcomes(out: &std::process::Output) -> std::collections::HashMap<String, String> {
    stdout_of(out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn out_of_range_requests_get_enospc_and_einval() {
    if !have_python_nbd() {
        return;
    }
    let size = 4 * MIB;
    let mut server = Server::start(size);
    let out = run_ok_within(&mut python_nbd(ERRORS, &[&server.tcp_uri]), TOOL_TIMEOUT);
    let got = outcomes(&out);
    let expect = [
        ("write_straddling_end", "ENOSPC"),
        ("write_at_end", "ENOSPC"),
        ("write_far_past_end", "ENOSPC"),
        ("read_straddling_end", "EINVAL"),
        ("read_at_end", "EINVAL"),
        ("read_unknown_flag", "EINVAL"),
        ("trim_past_end", "EINVAL"),
        ("zero_past_end", "ENOSPC"),
        // The connection survives the errors.
        ("read_after_errors", "OK"),
        ("write_after_errors", "OK"),
    ];
    for (name, errno) in expect {
        assert_eq!(got.get(name).map(String::as_str), Some(errno), "{name}: {got:?}");
    }
    // Nothing was written past or at the end, and the file kept its size.
    assert_eq!(std::fs::metadata(&server.file).unwrap().len(), size);
    assert!(server.stop().success(), "log:\n{}", server.log());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !have_python_nbd() {
        return;
    }
    let mut server = Server::start_with(4 * MIB, &["--read-only"]);
    let out = run_ok_within(&mut python_nbd(READ_ONLY_ERRORS, &[&server.unix_uri]), TOOL_TIMEOUT);
    let got = outcomes(&out);
    for (name, errno) in
        [("write", "EPERM"), ("write_fua", "EPERM"), ("zero", "EPERM"), ("trim", "EPERM"), ("read", "OK")]
    {
        assert_eq!(got.get(name).map(String::as_str), Some(errno), "{name}: {got:?}");
    }
    assert!(got.contains_key("flush"), "{got:?}");
    assert!(std::fs::read(&server.file).unwrap().iter().all(|&b| b == 0), "a write reached the file");
    assert!(server.stop().success(), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// Stopping: SIGTERM / SIGINT
// ---------------------------------------------------------------------------------------------

const IDLE_CLIENT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()  # idle until told to go on
try:
    h.pread(512, 0)
    print("read after stop: OK", flush=True)
except nbd.Error as e:
    print("read after stop: failed", e.errno, flush=True)
"#;

fn assert_stopped_cleanly(server: &mut Server, status: std::process::ExitStatus, elapsed: Duration) {
    assert!(status.success(), "rdbd exited with {status}; log:\n{}", server.log());
    assert!(elapsed < Duration::from_secs(10), "rdbd took {elapsed:?} to stop");
    assert!(!server.socket.exists(), "unix socket {} left behind", server.socket.display());
    let addr = server.tcp_uri.trim_start_matches("nbd://").trim_end_matches('/').to_string();
    assert!(std::net::TcpStream::connect(&addr).is_err(), "still accepting TCP on {addr}");
}

#[test]
fn sigterm_with_idle_clients_connected() {
    if !have_python_nbd() {
        return;
    }
    use std::io::{BufRead, BufReader, Read, Write};
    let mut server = Server::start(4 * MIB);

    // A fully negotiated libnbd client that sits idle.
    let mut client = python_nbd(IDLE_CLIENT, &[&server.unix_uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client_out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    client_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    // A raw TCP client that stalls in the middle of the handshake.
    let addr = server.tcp_uri.trim_start_matches("nbd://").trim_end_matches('/').to_string();
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");

    let started = Instant::now();
    let status = server.stop();
    assert_stopped_cleanly(&mut server, status, started.elapsed());

    // Both clients see the connection closed.
    let mut rest = Vec::new();
    assert!(raw.read_to_end(&mut rest).is_ok(), "raw client connection not closed");
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut after = String::new();
    client_out.read_to_string(&mut after).unwrap();
    assert!(after.contains("read after stop: failed"), "idle client still served: {after}");
    let _ = client.wait();
}

#[test]
fn sigterm_after_workload() {
    if !have_tool("nbdcopy") {
        return;
    }
    let size = 16 * MIB;
    let mut server = Server::start(size);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src.bin");
    random_file(&src, size as usize, 9);
    run_ok_within(
        Command::new("nbdcopy").args(["-C", "4", "-T", "4"]).arg(&src).arg(&server.unix_uri),
        TOOL_TIMEOUT,
    );
    let started = Instant::now();
    let status = server.stop();
    assert_stopped_cleanly(&mut server, status, started.elapsed());
    assert_same_contents(&src, &server.file);
}

#[test]
fn sigterm_during_workload_exits_cleanly() {
    if !have_tool("fio") {
        return;
    }
    let mut server = Server::start(32 * MIB);
    let work = tempfile::tempdir().unwrap();
    let mut fio = Command::new("fio")
        .current_dir(work.path())
        .args([
            "--name=busy",
            "--ioengine=nbd",
            &format!("--uri={}", server.unix_uri),
            "--rw=randrw",
            "--bs=64k",
            "--size=32M",
            "--numjobs=2",
            "--iodepth=32",
            "--time_based=1",
            "--runtime=20",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until both connections are up and busy: fio's writes land in the (sparse) file.
    assert!(
        wait_until(Duration::from_secs(10), || connections_logged(&server) >= 2),
        "fio did not connect; log:\n{}",
        server.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || holds_data(&server.file, 0..32 * MIB)),
        "fio wrote nothing within 10 s; log:\n{}",
        server.log()
    );
    let started = Instant::now();
    let status = server.stop();
    let elapsed = started.elapsed();
    let fio_done = wait_until(Duration::from_secs(10), || fio.try_wait().unwrap().is_some());
    if !fio_done {
        let _ = fio.kill();
    }
    let _ = fio.wait();
    assert_stopped_cleanly(&mut server, status, elapsed);
    assert!(fio_done, "fio kept running after the server stopped");
}

#[test]
fn sigint_stops_cleanly() {
    if !have_tool("nbdinfo") {
        return;
    }
    let mut server = Server::start(4 * MIB);
    // Serve one client first, so the server is past its start-up.
    run_ok_within(Command::new("nbdinfo").args(["--size", &server.unix_uri]), TOOL_TIMEOUT);
    let started = Instant::now();
    server.signal(rustix::process::Signal::INT);
    let status = server.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("rdbd ignored SIGINT; log:\n{}", server.log()));
    assert_stopped_cleanly(&mut server, status, started.elapsed());
}

/// Scripts (and this harness) treat the "listening on" lines as "ready"; a stop request sent
/// right after them must still be a clean stop, not death by the default signal action.
#[test]
fn signal_right_after_listening_is_a_clean_stop() {
    for round in 0..10 {
        let mut server = Server::start(MIB);
        let signal =
            if round % 2 == 0 { rustix::process::Signal::TERM } else { rustix::process::Signal::INT };
        let started = Instant::now();
        server.signal(signal);
        let status = server
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("rdbd ignored {signal:?}; log:\n{}", server.log()));
        assert!(
            status.success(),
            "round {round}: {signal:?} sent right after the listening lines: rdbd exited with {status} \
             (socket left behind: {}); log:\n{}",
            server.socket.exists(),
            server.log()
        );
        assert_stopped_cleanly(&mut server, status, started.elapsed());
    }
}

// ---------------------------------------------------------------------------------------------
// Command-line errors: one line, non-zero exit, no panic
// ---------------------------------------------------------------------------------------------

fn rdbd_fails(args: &[&str]) -> String {
    let out = output_within(
        Command::new(rdbd_bin()).arg("serve").args(args).env_remove("RDBD_LOG"),
        Duration::from_secs(10),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "rdbd serve {args:?} succeeded; stderr:\n{stderr}");
    assert_ne!(out.status.code(), Some(101), "rdbd serve {args:?} panicked:\n{stderr}");
    assert!(out.status.code().is_some(), "rdbd serve {args:?} died from a signal: {}", out.status);
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "rdbd serve {args:?} printed {bad:?}:\n{stderr}");
    }
    stderr
}

#[test]
fn cli_missing_file_without_size() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let stderr = rdbd_fails(&["--file", "/nonexistent/x", "--unix", sock.to_str().unwrap()]);
    assert_one_line_error(&stderr, &["/nonexistent/x"]);
    assert!(!sock.exists(), "socket created although the server failed");
}

#[test]
fn cli_file_in_missing_directory_with_size() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let stderr = rdbd_fails(&["--file", "/nonexistent/x", "--size", "1M", "--unix", sock.to_str().unwrap()]);
    assert_one_line_error(&stderr, &["/nonexistent/x"]);
    // The cause should be stated once, not repeated by the error chain.
    let cause = "No such file or directory";
    assert!(stderr.matches(cause).count() <= 1, "cause repeated in the message: {stderr}");
}

#[test]
fn cli_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("one.img");
    std::fs::File::create(&file).unwrap().set_len(MIB).unwrap();
    let sock = dir.path().join("s.sock");
    let stderr =
        rdbd_fails(&["--file", file.to_str().unwrap(), "--size", "2M", "--unix", sock.to_str().unwrap()]);
    assert_one_line_error(&stderr, &["size"]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), MIB, "the file was resized");
}

#[test]
fn cli_tcp_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(MIB).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = rdbd_fails(&["--file", file.to_str().unwrap(), "--listen", &addr]);
    assert_one_line_error(&stderr, &[&addr, "in use"]);
}

#[test]
fn cli_unix_socket_of_a_live_server_in_use() {
    if !have_tool("nbdinfo") {
        return;
    }
    let mut server = Server::start(MIB);
    let other = server.dir.path().join("other.img");
    std::fs::File::create(&other).unwrap().set_len(MIB).unwrap();
    let stderr = rdbd_fails(&["--file", other.to_str().unwrap(), "--unix", server.socket.to_str().unwrap()]);
    assert_one_line_error(&stderr, &["in use"]);
    // The first server's socket survives and still serves.
    let out = run_ok_within(Command::new("nbdinfo").args(["--size", &server.unix_uri]), TOOL_TIMEOUT);
    assert_eq!(stdout_of(&out).trim(), MIB.to_string());
    assert!(server.stop().success());
}

#[test]
fn cli_missing_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(MIB).unwrap();
    let stderr = rdbd_fails(&["--file", file.to_str().unwrap()]);
    // clap reports usage errors itself (a short block with the usage line); its first line must
    // name what is missing.
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error:"), "{stderr}");
    assert!(stderr.contains("--listen") && stderr.contains("--unix"), "{stderr}");
}

/// TRIM and WRITE_ZEROES may be far longer than the 32 MiB payload limit: the kernel sends up to
/// about 4 GiB in one request. Data on both sides of the range must survive.
const HUGE_TRIM_AND_ZERO: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
span = 0xFFFFF000                      # the largest 4 KiB-aligned u32 length
edge = b"\xa5" * 4096
h.pwrite(edge, 0)
h.pwrite(edge, 4096 + span)
h.pwrite(b"\x5a" * 65536, 1 << 31)     # data inside the range
h.zero(span, 4096)                     # one WRITE_ZEROES request of ~4 GiB
assert h.pread(65536, 1 << 31) == bytes(65536), "zeroed range still holds data"
h.pwrite(b"\x5a" * 65536, 1 << 31)
h.trim(span, 4096)                     # one TRIM request of ~4 GiB
h.zero(span, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 1 << 31) == bytes(65536), "NO_HOLE zeroing left data"
assert h.pread(4096, 0) == edge and h.pread(4096, 4096 + span) == edge, "neighbours damaged"
h.flush()
h.shutdown()
print("ok")
"#;

#[test]
fn four_gib_trim_and_write_zeroes_in_one_request() {
    if !have_python_nbd() {
        return;
    }
    let mut server = Server::start(5 << 30);
    let out = run_ok_within(&mut python_nbd(HUGE_TRIM_AND_ZERO, &[&server.unix_uri]), TOOL_TIMEOUT);
    assert_eq!(stdout_of(&out).trim(), "ok");
    assert!(server.stop().success());
}
