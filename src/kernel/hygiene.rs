//! Process settings a daemon serving a kernel NBD device needs, so that the kernel's writeback
//! through /dev/nbdN cannot wait on memory that only that writeback would free.
//!
//! Each returns a typed error the daemon logs; none is fatal by itself.

use std::io;
use std::path::{Path, PathBuf};

use rustix::mm::MlockAllFlags;

/// The score that exempts a process from the OOM killer.
pub const OOM_SCORE_ADJ_MIN: i32 = -1000;

#[derive(Debug, thiserror::Error)]
pub enum HygieneError {
    #[error("prctl(PR_SET_IO_FLUSHER): {0} (needs Linux 5.6 and CAP_SYS_RESOURCE)")]
    IoFlusher(io::Error),
    #[error("mlockall(MCL_CURRENT|MCL_FUTURE): {0} (needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK)")]
    LockMemory(io::Error),
    #[error("oom_score_adj {value} is outside -1000..=1000")]
    OomScoreRange { value: i32 },
    #[error("writing {path}: {error} (lowering the score needs CAP_SYS_RESOURCE)")]
    OomScoreAdj { path: PathBuf, error: io::Error },
}

/// Marks the process as an I/O flusher: its allocations then never recurse into I/O (and so
/// into our own device), and its dirty pages are not throttled. The flag is per thread and
/// copied to threads and children created afterwards: call it before starting any.
pub fn set_io_flusher() -> Result<(), HygieneError> {
    // `true` passes 1: a 0 would clear the flag.
    rustix::process::configure_io_flusher_behavior(true).map_err(|e| HygieneError::IoFlusher(e.into()))
}

/// Locks current and future mappings in memory, so serving a request never waits on a page-in
/// (which could be queued behind our own device).
pub fn lock_memory() -> Result<(), HygieneError> {
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE)
        .map_err(|e| HygieneError::LockMemory(e.into()))
}

/// Sets our OOM score adjustment ([`OOM_SCORE_ADJ_MIN`] keeps the OOM killer off the process
/// whose death would lose every dirty page of the device).
pub fn set_oom_score_adj(value: i32) -> Result<(), HygieneError> {
    write_oom_score_adj(Path::new("/proc/self/oom_score_adj"), value)
}

/// [`set_oom_score_adj`] on a given file (a test tree).
pub fn write_oom_score_adj(path: &Path, value: i32) -> Result<(), HygieneError> {
    if !(-1000..=1000).contains(&value) {
        return Err(HygieneError::OomScoreRange { value });
    }
    std::fs::write(path, format!("{value}\n"))
        .map_err(|error| HygieneError::OomScoreAdj { path: path.to_owned(), error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_score_is_written_as_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oom_score_adj");
        write_oom_score_adj(&path, OOM_SCORE_ADJ_MIN).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "-1000\n");
    }

    #[test]
    fn oom_score_out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_oom_score_adj(&dir.path().join("x"), -1001).unwrap_err();
        assert!(matches!(err, HygieneError::OomScoreRange { value: -1001 }));
    }

    #[test]
    fn oom_score_error_names_the_file() {
        let err = write_oom_score_adj(Path::new("/nonexistent/oom_score_adj"), 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/oom_score_adj"), "{err}");
    }

    #[test]
    fn io_flusher_error_is_typed() {
        // Root with CAP_SYS_RESOURCE on Linux >= 5.6 succeeds; anything else must say why.
        if let Err(e) = set_io_flusher() {
            assert!(e.to_string().contains("PR_SET_IO_FLUSHER"), "{e}");
        } else {
            assert!(rustix::process::is_io_flusher().unwrap());
        }
    }
}
