//! [`diff`]: the ordered operations that turn what the kernel holds into what is desired.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{DesiredState, FdbEntry, KernelEntries, Neighbour, Route};
use crate::mac::MacAddr;

/// The ordered phases of a diff; operations of one phase are independent of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Route, neighbour and FDB deletions.
    Delete,
    /// Neighbour and FDB additions (the entries routes rely on).
    Entries,
    /// Route additions and replacements.
    Routes,
}

/// One kernel write. Additions have replace semantics: applying one twice is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", content = "entry", rename_all = "snake_case")]
pub enum Op {
    DelRoute(Route),
    DelNeighbour(Neighbour),
    DelFdb(FdbEntry),
    /// Adds the neighbour, or replaces the MAC of an existing one for the same IP.
    AddNeighbour(Neighbour),
    /// Adds the FDB entry, or replaces the destination of an existing one for the same MAC.
    AddFdb(FdbEntry),
    AddRoute(Route),
    /// Replaces the route to the same destination (atomic in the kernel).
    ReplaceRoute(Route),
}

impl Op {
    pub fn phase(&self) -> Phase {
        match self {
            Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_) => Phase::Delete,
            Op::AddNeighbour(_) | Op::AddFdb(_) => Phase::Entries,
            Op::AddRoute(_) | Op::ReplaceRoute(_) => Phase::Routes,
        }
    }

    /// The device the entry lives on.
    pub fn dev(&self) -> &str {
        match self {
            Op::DelRoute(r) | Op::AddRoute(r) | Op::ReplaceRoute(r) => &r.dev,
            Op::DelNeighbour(n) | Op::AddNeighbour(n) => &n.dev,
            Op::DelFdb(f) | Op::AddFdb(f) => &f.dev,
        }
    }

    pub fn is_delete(&self) -> bool {
        self.phase() == Phase::Delete
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::DelRoute(r) => write!(f, "delete route {r}"),
            Op::DelNeighbour(n) => write!(f, "delete neighbour {n}"),
            Op::DelFdb(e) => write!(f, "delete fdb {e}"),
            Op::AddNeighbour(n) => write!(f, "add neighbour {n}"),
            Op::AddFdb(e) => write!(f, "add fdb {e}"),
            Op::AddRoute(r) => write!(f, "add route {r}"),
            Op::ReplaceRoute(r) => write!(f, "replace route {r}"),
        }
    }
}

/// The operations that turn `observed` into `desired`, in phase order (see the module
/// docs). Empty when the kernel already holds exactly the desired entries.
pub fn diff(desired: &DesiredState, observed: &KernelEntries) -> Vec<Op> {
    let mut deletes = Vec::new();
    let mut entries = Vec::new();
    let mut routes = Vec::new();

    for (dst, route) in &observed.routes {
        if !desired.routes.contains_key(dst) {
            deletes.push(Op::DelRoute(route.clone()));
        }
    }

    // Neighbours: keyed by (dev, ip); a different MAC is replaced by the add.
    let wanted_neigh: BTreeMap<(&str, IpAddr), &Neighbour> = desired
        .neighbours
        .iter()
        .map(|n| ((n.dev.as_str(), n.ip), n))
        .collect();
    for n in &observed.neighbours {
        if !wanted_neigh.contains_key(&(n.dev.as_str(), n.ip)) {
            deletes.push(Op::DelNeighbour(n.clone()));
        }
    }

    // FDB: keyed by (dev, mac); the kernel may hold several destinations for one MAC.
    let wanted_fdb: BTreeMap<(&str, MacAddr), IpAddr> = desired
        .fdb
        .iter()
        .map(|e| ((e.dev.as_str(), e.mac), e.dst))
        .collect();
    let mut held_fdb: BTreeMap<(&str, MacAddr), Vec<&FdbEntry>> = BTreeMap::new();
    for e in &observed.fdb {
        held_fdb.entry((e.dev.as_str(), e.mac)).or_default().push(e);
    }
    for (key, held) in &held_fdb {
        let keep = match wanted_fdb.get(key) {
            // The wanted destination is there: drop only the others.
            Some(dst) if held.iter().any(|e| e.dst == *dst) => Some(*dst),
            // One wrong destination: the add replaces it in place, no gap.
            Some(_) if held.len() == 1 => Some(held[0].dst),
            // Several wrong destinations (or none wanted): clear them, then add.
            _ => None,
        };
        for e in held {
            if Some(e.dst) != keep {
                deletes.push(Op::DelFdb((*e).clone()));
            }
        }
    }

    for n in &desired.neighbours {
        if !observed.neighbours.contains(n) {
            entries.push(Op::AddNeighbour(n.clone()));
        }
    }
    for e in &desired.fdb {
        if !observed.fdb.contains(e) {
            entries.push(Op::AddFdb(e.clone()));
        }
    }

    for (dst, route) in &desired.routes {
        match observed.routes.get(dst) {
            None => routes.push(Op::AddRoute(route.clone())),
            Some(held) if held != route => routes.push(Op::ReplaceRoute(route.clone())),
            Some(_) => {}
        }
    }

    deletes.extend(entries);
    deletes.extend(routes);
    deletes
}
