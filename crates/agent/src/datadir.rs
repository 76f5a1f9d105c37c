//! The agent's data directory: one agent at a time, private to root.
//!
//! The lock is taken before anything in the directory is opened, so a second `allot agent` on
//! the same directory fails at once and touches nothing (opening the journal zeroes its tail, and
//! that must never happen under a live agent). The lock is an `flock` on `agent.lock`: the kernel
//! drops it when the process dies, so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::AgentError;

/// Files the agent creates are readable by root alone.
pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Holds the data directory's lock for as long as it lives.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory (0700) if needed and takes its lock, or says who holds it.
    pub fn lock(path: &Path) -> Result<DataDir, AgentError> {
        let fail = |what: &str, e: std::io::Error| AgentError::Internal(format!("{what} {}: {e}", path.display()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
            .map_err(|e| fail("creating data dir", e))?;
        // A directory made by an older version (or by hand) may be world-readable.
        let mode = std::fs::metadata(path).map_err(|e| fail("reading data dir", e))?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| fail("making data dir private (0700)", e))?;
        }
        let lock_path = path.join("agent.lock");
        let mut file = open_private(&lock_path).map_err(|e| fail("opening lock file in", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                return Err(AgentError::Conflict(format!(
                    "data directory {} is in use by another allot agent{who}: stop that agent first, or give this one its own --data-dir",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(fail("locking data dir", e)),
        }
        // Who holds it, for the message above; the lock itself is the flock, not this text.
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(DataDir { path: path.to_path_buf(), _lock: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// Opens a file of the data dir for reading and writing, creating it 0600 (and making an
/// older, world-readable one private).
pub fn open_private(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(FILE_MODE).open(path)?;
    make_private(path)?;
    Ok(file)
}

/// Makes an existing file private (0600); files created by older versions were 0644.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_the_first_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let first = DataDir::lock(&path).unwrap();
        let err = DataDir::lock(&path).unwrap_err().to_string();
        assert!(err.contains("in use by another allot agent"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        DataDir::lock(&path).expect("free again once the holder is gone");
    }

    #[test]
    fn the_directory_and_lock_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = DataDir::lock(&path).unwrap();
        assert_eq!(std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(d.join("agent.lock")).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
