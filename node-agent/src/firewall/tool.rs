//! Running a firewall tool (`nft`, `iptables-nft-save`, ...): found once in the search
//! path, run with arguments and optional stdin, its failures turned into errors that name
//! the command and carry its stderr, and every write counted.
//!
//! The path found is used as is, never canonicalised: the iptables tools are one
//! multi-call binary that acts on the name it is run as.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use super::FirewallError;

/// `name` in the directories of `path` (a `PATH`-style list), if it is an executable file.
pub fn find_program(name: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// One tool of the host's packet filter.
pub struct Tool {
    pub program: PathBuf,
    writes: AtomicU64,
}

impl Tool {
    /// The tool `name` from `path`, if installed.
    pub fn find(name: &str, path: &OsString) -> Option<Tool> {
        find_program(name, path).map(|program| Tool {
            program,
            writes: AtomicU64::new(0),
        })
    }

    /// Runs the tool to read (no change to the host); its stdout.
    pub fn read(&self, args: &[&str]) -> Result<String, FirewallError> {
        self.run(args, None)
    }

    /// Runs the tool to change the host, with `stdin` as its input; counted in
    /// [`Tool::writes`] whether or not it succeeds.
    pub fn write(&self, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.run(args, stdin)
    }

    /// Write commands issued so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        let shown = format!("{} {}", self.program.display(), args.join(" "));
        let fail = |message: String| FirewallError::new(shown.trim_end(), message);
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        // A tool that fails early closes its stdin: its stderr then says more than the
        // broken pipe, so a write error is reported only if the tool succeeds.
        let write_err = stdin.and_then(|input| {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).err()
        });
        let out = child
            .wait_with_output()
            .map_err(|e| fail(format!("waiting for it: {e}")))?;
        if let (true, Some(e)) = (out.status.success(), write_err) {
            return Err(fail(format!("writing its input: {e}")));
        }
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let mut message = if err.is_empty() {
                out.status.to_string()
            } else {
                err
            };
            if let Some(input) = stdin {
                message.push_str(&format!("; its input was:\n{input}"));
            }
            Err(fail(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_the_given_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("nft");
        // Reads its input, as nft does (a tool that exits without reading it breaks the pipe).
        std::fs::write(&exe, "#!/bin/sh\ncat >/dev/null\necho \"$@\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("iptables-nft-save"), "not executable").unwrap();
        let path = OsString::from(dir.path());
        assert_eq!(find_program("nft", &path), Some(exe));
        assert_eq!(find_program("iptables-nft-save", &path), None);
        assert_eq!(find_program("ip", &path), None);
        let tool = Tool::find("nft", &path).unwrap();
        assert_eq!(tool.read(&["list", "tables"]).unwrap(), "list tables\n");
        assert_eq!(tool.writes(), 0);
        tool.write(&["-f", "-"], Some("table inet overlay {}\n"))
            .unwrap();
        assert_eq!(tool.writes(), 1);
    }
}
