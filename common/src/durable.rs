//! Durable file writes: the one way Overlay writes a file that holds state (the agent's
//! state and `subnet.env`, the CNI plugin's address reservations and conflist, the keys
//! and certificates of `overlayctl certs`, a daemon's `--addr-file`).
//!
//! [`write`] puts the contents in a new temp file in the target's own directory, created
//! with `O_CREAT|O_EXCL|O_NOFOLLOW` under a name nobody else uses (so a file or symlink
//! planted under a predictable name is never written through, reused or renamed into
//! place), gives it its mode with `fchmod` on the open file (whatever the umask or a
//! planted file said), writes and fsyncs it, renames it over the target (or links it to a
//! target that must not exist yet) and fsyncs the directory, so the new name itself
//! survives a power loss. A reader sees the old file or the new one, never half of one.
//! On any error the temp file is removed.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed write, remove or sync: what was being done, to which path, and why.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> FileError {
        FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }
}

/// How [`write`] treats the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// The file's permission bits, set with fchmod (the umask does not apply).
    pub mode: u32,
    /// Replace an existing target; when false, an existing target (a file, a directory, a
    /// symlink, even a dangling one) fails the write with `AlreadyExists` and is untouched.
    pub replace: bool,
}

impl WriteOptions {
    /// Replace the target if it exists.
    pub const fn replace(mode: u32) -> WriteOptions {
        WriteOptions {
            mode,
            replace: true,
        }
    }

    /// The target must not exist yet.
    pub const fn create_new(mode: u32) -> WriteOptions {
        WriteOptions {
            mode,
            replace: false,
        }
    }
}

/// Removes the temp file unless it was moved into place.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `contents` to `path` durably; see the module notes. The directory must exist.
pub fn write(path: &Path, contents: &[u8], opts: WriteOptions) -> Result<(), FileError> {
    let (dir, name) = split(path)?;
    let (file, tmp_path) = create_temp(&dir, &name, opts.mode)
        .map_err(|e| FileError::new("creating a temp file for", path, e))?;
    let mut tmp = TempFile {
        path: Some(tmp_path.clone()),
    };
    write_and_sync(file, contents, opts.mode).map_err(|e| FileError::new("writing", path, e))?;
    if opts.replace {
        std::fs::rename(&tmp_path, path)
            .map_err(|e| FileError::new("renaming into place", path, e))?;
        tmp.path = None;
    } else {
        // link(2) never follows or replaces an existing name: EEXIST instead.
        std::fs::hard_link(&tmp_path, path).map_err(|e| {
            let action = if e.kind() == std::io::ErrorKind::AlreadyExists {
                "refusing to replace the existing"
            } else {
                "linking into place"
            };
            FileError::new(action, path, e)
        })?;
        // Dropping the guard unlinks the temp name; the file lives on under `path`.
        drop(tmp);
    }
    sync_dir(&dir).map_err(|e| FileError::new("syncing the directory of", path, e))
}

/// Removes `path` and fsyncs its directory, so the removal survives a power loss. A
/// missing file is not an error: returns whether there was one.
pub fn remove(path: &Path) -> Result<bool, FileError> {
    let (dir, _) = split(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(FileError::new("removing", path, e)),
    }
    sync_dir(&dir).map_err(|e| FileError::new("syncing the directory of", path, e))?;
    Ok(true)
}

/// fsyncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    match d.sync_all() {
        // Some filesystems cannot sync a directory; there is nothing more to do there.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

fn split(path: &Path) -> Result<(PathBuf, String), FileError> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        FileError::new(
            "writing",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_string()))
}

/// A new file `.<name>.<pid>-<n>-<nanos>.tmp` in `dir`, created exclusively (never an
/// existing file, never through a symlink) with `mode`.
fn create_temp(dir: &Path, name: &str, mode: u32) -> std::io::Result<(File, PathBuf)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Short enough that the temp name fits NAME_MAX (255 bytes) whatever the target's
    // length: at most 64 bytes, cut at a character boundary.
    let mut cut = name.len().min(64);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let stem = &name[..cut];
    let mut last = None;
    for _ in 0..64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(
            ".{stem}.{}-{}-{nanos:08x}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("tried at least once"))
}

fn write_and_sync(mut file: File, contents: &[u8], mode: u32) -> std::io::Result<()> {
    // fchmod on the open file: the mode asked for, not the umask's version of it.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn writes_replace_atomically_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, b"one", WriteOptions::replace(0o600)).unwrap();
        write(&path, b"two", WriteOptions::replace(0o640)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path), 0o640);
        assert_eq!(names(dir.path()), vec!["state.json"]);
    }

    #[test]
    fn create_new_never_replaces_anything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write(&path, b"first", WriteOptions::create_new(0o600)).unwrap();
        let e = write(&path, b"second", WriteOptions::create_new(0o600)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("key.pem"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        // A dangling symlink is a name that exists: nothing is created through it.
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(write(&link, b"x", WriteOptions::create_new(0o600)).is_err());
        assert!(!dir.path().join("elsewhere").exists());
        assert_eq!(names(dir.path()), vec!["key.pem", "link.pem"]);
    }

    #[test]
    fn a_symlink_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        let path = dir.path().join("subnet.env");
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        write(&path, b"new", WriteOptions::replace(0o644)).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_failed_rename_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        let e = write(&path, b"x", WriteOptions::replace(0o644)).unwrap_err();
        assert!(e.to_string().starts_with("renaming into place"), "{e}");
        assert_eq!(names(dir.path()), vec!["busy"]);
    }

    #[test]
    fn remove_reports_whether_there_was_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10.244.7.2");
        write(&path, b"c1\n", WriteOptions::replace(0o644)).unwrap();
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
        assert!(names(dir.path()).is_empty());
    }
}
