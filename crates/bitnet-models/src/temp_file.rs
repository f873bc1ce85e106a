//! Files written under a temporary name beside their destination and renamed into place when
//! complete, so that a reader never sees half a file; and the process-wide list of those still
//! being written, so that an interrupted process can remove them before it exits.
//!
//! A [`TempFile`] removes its file when dropped unless [`TempFile::persist`] renamed it: every
//! error path cleans up. A signal kills the process without running destructors, so the
//! program's signal handler calls [`abandon_all`], which removes every registered file and
//! refuses new ones (closing the race with a writer that is about to create or rename one).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

struct Registry {
    /// Temporary files that exist and are not renamed yet.
    paths: Vec<PathBuf>,
    /// Set by [`abandon_all`]: the process is about to exit, nothing new may start.
    abandoned: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { paths: Vec::new(), abandoned: false });

fn registry() -> MutexGuard<'static, Registry> {
    // A panic while the lock was held leaves a list that is still valid.
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn interrupted(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        format!("{}: the process is being interrupted", path.display()),
    )
}

/// A file being written under a temporary name. See the module doc.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates the temporary file `path` with `open` (which returns the handle to write
    /// through) and registers it.
    pub fn create<T>(path: PathBuf, open: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<(Self, T)> {
        let mut registry = registry();
        if registry.abandoned {
            return Err(interrupted(&path));
        }
        let handle = open(&path)?;
        registry.paths.push(path.clone());
        Ok((TempFile { path, persisted: false }, handle))
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `dest`; on failure the temporary file is removed.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        let mut registry = registry();
        if registry.abandoned {
            return Err(interrupted(&self.path));
        }
        std::fs::rename(&self.path, dest)?;
        registry.paths.retain(|p| p != &self.path);
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let mut registry = registry();
            let _ = std::fs::remove_file(&self.path);
            registry.paths.retain(|p| p != &self.path);
        }
    }
}

/// The temporary name of `dest` for the writers that need one: `dest.tmp`, beside it.
pub fn beside(dest: &Path) -> PathBuf {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Removes every temporary file still being written and refuses new ones; returns the paths
/// removed. For a signal handler, just before the process exits.
pub fn abandon_all() -> Vec<PathBuf> {
    let mut registry = registry();
    registry.abandoned = true;
    let paths = std::mem::take(&mut registry.paths);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    paths
}

/// The temporary files being written now (for tests and messages).
pub fn in_progress() -> Vec<PathBuf> {
    registry().paths.clone()
}
