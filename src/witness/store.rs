//! The witness's state file: for each resource, the nodes known to be outdated. Written whole,
//! durably and atomically (a new file, fsynced, renamed over the old one), before the verdict
//! that depends on it is sent.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::votes::Persistent;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a witness state file: {source}")]
    Format { path: PathBuf, source: serde_json::Error },
}

/// Reads the state; a missing file is a witness that never outdated anyone.
pub fn load(path: &Path) -> Result<Persistent, StoreError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Format { path: path.into(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persistent::new()),
        Err(source) => Err(StoreError::Io { path: path.into(), source }),
    }
}

/// Replaces the state durably.
pub fn save(path: &Path, state: &Persistent) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.into(), source };
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    let text = serde_json::to_vec_pretty(state).expect("a map of strings serialises");
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn state_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.json");
        assert!(load(&path).unwrap().is_empty());
        let state = Persistent::from([("r0".to_string(), BTreeSet::from(["beta".to_string()]))]);
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), state);
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(load(&path), Err(StoreError::Format { .. })));
    }
}
