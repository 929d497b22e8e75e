//! The names of the files the agent leaves on a host for others to read: runtimes, the CNI
//! plugin, Docker, `overlayctl lab`. One definition each, so a reader never looks for a
//! file under a name the writer does not use.

/// In the agent's run dir (`/run/overlay`): the host's subnet, MTU and network
/// ([`crate::subnet_env::SubnetEnv`]).
pub const SUBNET_ENV: &str = "subnet.env";

/// In the CNI config dir (`/etc/cni/net.d`): overlay-cni chained with portmap. The name
/// sorts early, so runtimes that take the first conflist pick it.
pub const CNI_CONFLIST: &str = "10-overlay.conflist";
