//! Address management for one network on one host: which address of the host's subnet
//! each attachment (container id + interface name) holds.
//!
//! State is a directory, `<dataDir>/<network>/`, with one file per held address (named
//! by the address, holding the attachment), in the style of the reference `host-local`
//! plugin, so an operator can read it with `ls` and `cat`. Why files and not one JSON
//! document: a reservation is created or removed by one atomic rename or unlink (each
//! followed by an fsync of the directory, `overlay_common::durable`), so a plugin killed at
//! any instant, or a power loss, leaves every address either clearly held or clearly
//! free. Every plugin process is short-lived and several run at once, so all access is
//! serialized by `flock` on `<dir>/lock`, taken for the lifetime of an [`IpamStore`].
//!
//! Allocation continues after the last address handed out (`last_reserved_ip`) instead
//! of taking the lowest free one: an address released a moment ago is only reused after
//! the rest of the subnet has been, which keeps a stale peer (an ARP cache, a conntrack
//! entry, a client that still holds the old address) from reaching the wrong container.

use std::collections::HashSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::config::Attachment;
use crate::files::write_atomic;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::files::FileError),
    #[error("no free address in {subnet}: all {capacity} are held")]
    Exhausted { subnet: Ipv4Net, capacity: u32 },
    #[error("subnet {0} has no addresses for containers (it needs a /30 or larger)")]
    TooSmall(Ipv4Net),
}

impl IpamError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
        let path = path.to_path_buf();
        move |source| IpamError::Io {
            action,
            path,
            source,
        }
    }
}

/// The addresses containers may get from `subnet`: every host address except the first
/// (the bridge's, the containers' gateway); the network and broadcast addresses are
/// never host addresses. Returned as an inclusive `u32` range.
pub fn assignable_range(subnet: Ipv4Net) -> Option<(u32, u32)> {
    let network = u32::from(subnet.network());
    let broadcast = u32::from(subnet.broadcast());
    // network, gateway, at least one container, broadcast.
    let (first, last) = (network.checked_add(2)?, broadcast.checked_sub(1)?);
    (subnet.prefix_len() <= 30 && first <= last).then_some((first, last))
}

/// The IPAM state of one network, locked for as long as this value lives.
pub struct IpamStore {
    dir: PathBuf,
    _lock: File,
}

impl IpamStore {
    /// Opens (creating it if needed) `<data_dir>/<network>/` and waits for its lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<IpamStore, IpamError> {
        let dir = data_dir.join(network);
        std::fs::create_dir_all(&dir).map_err(IpamError::io("creating", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(IpamError::io("opening", &lock_path))?;
        flock_exclusive(&lock).map_err(IpamError::io("locking", &lock_path))?;
        Ok(IpamStore { dir, _lock: lock })
    }

    /// Like [`IpamStore::open`], but `Ok(None)` when the network has no state at all
    /// (nothing to release), without creating anything.
    pub fn open_existing(data_dir: &Path, network: &str) -> Result<Option<IpamStore>, IpamError> {
        if !data_dir.join(network).is_dir() {
            return Ok(None);
        }
        IpamStore::open(data_dir, network).map(Some)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every reservation, by address.
    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, Attachment)>, IpamError> {
        let mut entries = Vec::new();
        let listing = std::fs::read_dir(&self.dir).map_err(IpamError::io("listing", &self.dir))?;
        for entry in listing {
            let entry = entry.map_err(IpamError::io("listing", &self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // Released by no one else (we hold the lock), but be lenient anyway.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(IpamError::io("reading", &path)(e)),
            };
            let mut lines = text.lines().map(str::trim);
            let container_id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            entries.push((
                ip,
                Attachment {
                    container_id,
                    ifname,
                },
            ));
        }
        entries.sort();
        Ok(entries)
    }

    /// The address `attachment` holds in `subnet`, if any.
    pub fn find(
        &self,
        attachment: &Attachment,
        subnet: Ipv4Net,
    ) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(ip, a)| a == attachment && subnet.contains(ip))
            .map(|(ip, _)| ip))
    }

    /// The address of `attachment`: the one it holds already (a repeated ADD gets the
    /// same answer), else the next free one after the last handed out. Reservations of
    /// this attachment outside `subnet` (the host got another subnet) are dropped.
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        subnet: Ipv4Net,
    ) -> Result<Ipv4Addr, IpamError> {
        let (first, last) = assignable_range(subnet).ok_or(IpamError::TooSmall(subnet))?;
        let entries = self.entries()?;
        let mut held = HashSet::new();
        for (ip, a) in &entries {
            if a == attachment {
                if subnet.contains(ip) {
                    return Ok(*ip);
                }
                self.remove(*ip)?;
                continue;
            }
            held.insert(u32::from(*ip));
        }
        let capacity = last - first + 1;
        let start = match self.last_reserved() {
            Some(prev) if (first..last).contains(&prev) => prev + 1,
            _ => first,
        };
        let candidate = (0..capacity)
            .map(|i| first + (start - first + i) % capacity)
            .find(|c| !held.contains(c))
            .ok_or(IpamError::Exhausted { subnet, capacity })?;
        let ip = Ipv4Addr::from(candidate);
        let path = self.dir.join(ip.to_string());
        write_atomic(
            &path,
            format!("{}\n{}\n", attachment.container_id, attachment.ifname).as_bytes(),
        )?;
        write_atomic(&self.dir.join(LAST_RESERVED), format!("{ip}\n").as_bytes())?;
        Ok(ip)
    }

    fn last_reserved(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
    }

    /// Releases `ip`: unlinks its file and syncs the directory, so a released address
    /// does not come back as held after a power loss.
    fn remove(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        overlay_common::durable::remove(&self.dir.join(ip.to_string()))?;
        Ok(())
    }

    /// Releases every address `attachment` holds; returns them (none is fine).
    pub fn release(&self, attachment: &Attachment) -> Result<Vec<Ipv4Addr>, IpamError> {
        let mut released = Vec::new();
        for (ip, a) in self.entries()? {
            if &a == attachment {
                self.remove(ip)?;
                released.push(ip);
            }
        }
        Ok(released)
    }

    /// Releases every reservation whose attachment is not in `valid`; returns them.
    pub fn retain_only(
        &self,
        valid: &[Attachment],
    ) -> Result<Vec<(Ipv4Addr, Attachment)>, IpamError> {
        let valid: HashSet<&Attachment> = valid.iter().collect();
        let mut released = Vec::new();
        for (ip, a) in self.entries()? {
            if !valid.contains(&a) {
                self.remove(ip)?;
                released.push((ip, a));
            }
        }
        Ok(released)
    }
}

fn flock_exclusive(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock only uses the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn subnet() -> Ipv4Net {
        "10.244.7.0/24".parse().unwrap()
    }

    #[test]
    fn never_the_network_gateway_or_broadcast() {
        assert_eq!(
            assignable_range("10.0.0.0/30".parse().unwrap()),
            Some((
                u32::from(Ipv4Addr::new(10, 0, 0, 2)),
                u32::from(Ipv4Addr::new(10, 0, 0, 2))
            ))
        );
        assert_eq!(assignable_range("10.0.0.0/31".parse().unwrap()), None);
        assert_eq!(assignable_range("10.0.0.0/32".parse().unwrap()), None);
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        let tiny: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        assert_eq!(
            store.allocate(&att("a"), tiny).unwrap(),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        assert!(matches!(
            store.allocate(&att("b"), tiny),
            Err(IpamError::Exhausted { capacity: 1, .. })
        ));
    }

    #[test]
    fn allocation_is_idempotent_and_moves_on_after_a_release() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        let a = store.allocate(&att("a"), subnet()).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 7, 2));
        assert_eq!(store.allocate(&att("a"), subnet()).unwrap(), a);
        let b = store.allocate(&att("b"), subnet()).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 244, 7, 3));
        assert_eq!(store.release(&att("a")).unwrap(), vec![a]);
        assert!(store.release(&att("a")).unwrap().is_empty());
        drop(store);
        // A new store (a new plugin process) continues after the last handed out.
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        assert_eq!(store.find(&att("b"), subnet()).unwrap(), Some(b));
        let c = store.allocate(&att("c"), subnet()).unwrap();
        assert_eq!(c, Ipv4Addr::new(10, 244, 7, 4));
    }

    #[test]
    fn allocation_wraps_around_past_the_last_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        let small: Ipv4Net = "10.0.0.0/29".parse().unwrap(); // .2 to .6
        let got: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|id| store.allocate(&att(id), small).unwrap().octets()[3])
            .collect();
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        store.release(&att("c")).unwrap();
        assert_eq!(store.allocate(&att("f"), small).unwrap().octets()[3], 4);
        store.release(&att("a")).unwrap();
        assert_eq!(store.allocate(&att("g"), small).unwrap().octets()[3], 2);
    }

    #[test]
    fn a_new_subnet_drops_the_old_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        store.allocate(&att("a"), subnet()).unwrap();
        let other: Ipv4Net = "10.244.9.0/24".parse().unwrap();
        assert_eq!(
            store.allocate(&att("a"), other).unwrap(),
            Ipv4Addr::new(10, 244, 9, 2)
        );
        assert_eq!(store.entries().unwrap().len(), 1);
    }

    #[test]
    fn retain_only_releases_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = IpamStore::open(dir.path(), "n").unwrap();
        for id in ["a", "b", "c"] {
            store.allocate(&att(id), subnet()).unwrap();
        }
        let released = store.retain_only(&[att("b")]).unwrap();
        assert_eq!(
            released
                .iter()
                .map(|(_, a)| a.container_id.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "c"]
        );
        assert_eq!(
            store.entries().unwrap(),
            vec![(Ipv4Addr::new(10, 244, 7, 3), att("b"))]
        );
    }

    #[test]
    fn open_existing_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(IpamStore::open_existing(dir.path(), "n").unwrap().is_none());
        assert!(!dir.path().join("n").exists());
    }
}
