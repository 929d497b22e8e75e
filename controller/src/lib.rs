//! overlay-controller: the only etcd client of an Overlay cluster.
//!
//! It stores the network config and the subnet leases in etcd, hands leases out to agents,
//! and serves every agent's watch from one in-memory cache fed by a single etcd watch.

pub mod election;
pub mod error;
pub mod fanout;
pub mod frames;
pub mod grpc;
pub mod health;
pub mod janitor;
pub mod leases;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod store;
pub mod view;
