//! Entering a network namespace: the one `setns(2)` of the project (the CNI plugin's
//! container plumbing and the lab's namespaces both use it).
//!
//! It moves only the calling thread. Sockets opened afterwards belong to that namespace for
//! their whole life, which is how a netlink socket "in" a container is made: enter, open,
//! come back.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/*` or
/// `/proc/*/ns/net` file).
pub fn enter(ns: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor the borrow keeps open; it changes only the calling
    // thread's network namespace and is async-signal-safe (usable between fork and exec).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
