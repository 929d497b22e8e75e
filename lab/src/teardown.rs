//! Removing a lab. Everything goes with the lab's namespaces: deleting one kills every
//! process still inside it and drops every link, route and rule it held, so teardown
//! needs nothing but the namespace prefix and the directory, works on a lab half-made by
//! a crash, and is safe to repeat. Only a test's children are killed first (so that they
//! are reaped); a detached lab's daemons are not stopped one by one, since a pid in
//! `lab.json` may be stale and a namespace cannot be.

use std::path::Path;

use crate::{file_err, netns, Lab, LabError};

impl Lab {
    /// Removes everything; reports every failure but keeps going.
    pub fn teardown(&mut self) -> Vec<LabError> {
        self.stop_children();
        teardown_prefix(&self.state.ns_prefix, &self.state.dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down_on_drop {
            for e in self.teardown() {
                eprintln!("lab teardown: {e}");
            }
        }
    }
}

/// Deletes every namespace named `<prefix>-*` (killing what runs inside) and `dir`.
/// Safe to run twice and on a half-made lab.
pub fn teardown_prefix(prefix: &str, dir: &Path) -> Vec<LabError> {
    let mut errors = delete_namespaces(prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            errors.push(file_err(dir, e));
        }
    }
    errors
}

/// [`teardown_prefix`], but the `*.log` files under `dir` stay where they are.
pub fn teardown_keeping_logs(prefix: &str, dir: &Path) -> Vec<LabError> {
    let mut errors = delete_namespaces(prefix);
    remove_all_but_logs(dir, &mut errors);
    errors
}

fn remove_all_but_logs(dir: &Path, errors: &mut Vec<LabError>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => {
                remove_all_but_logs(&path, errors);
                // Fails, harmlessly, where a log stays inside.
                let _ = std::fs::remove_dir(&path);
                Ok(())
            }
            _ if path.extension().is_some_and(|e| e == "log") => Ok(()),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = result {
            errors.push(file_err(&path, e));
        }
    }
}

fn delete_namespaces(prefix: &str) -> Vec<LabError> {
    let mut errors = Vec::new();
    // Workloads first, then hosts, then the underlay (whose bridge ports vanish with them).
    let mut names = netns::list_with_prefix(&format!("{prefix}-"));
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in names {
        if let Err(e) = netns::delete(&ns) {
            errors.push(e);
        }
    }
    errors
}
