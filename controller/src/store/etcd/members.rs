//! Several etcd members: each controller checks every member once a second and takes one
//! that does not answer out of the balanced channel, and a request that failed before it
//! was sent is tried again on another member within its deadline.

use super::*;

/// How often, and how patiently, [`member_health`] asks each member for its status.
pub(super) const MEMBER_PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub(super) const MEMBER_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the members that do not answer out of `client`'s balanced channel (see the
/// module notes): asks each member (a client of its own, `probes`) for its status every
/// [`MEMBER_PROBE_INTERVAL`], and removes or adds endpoints as [`members_to_change`] says.
/// Ends when `alive` is gone (the last clone of the store was dropped).
pub(super) async fn member_health(
    client: Client,
    probes: Vec<(String, Client)>,
    alive: std::sync::Weak<()>,
) {
    let mut removed = vec![false; probes.len()];
    let mut tick = tokio::time::interval(MEMBER_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
            return;
        }
        let answers = futures::future::join_all(probes.iter().map(|(_, probe)| async move {
            let mut maintenance = probe.maintenance_client();
            answers_status(
                tokio::time::timeout(MEMBER_PROBE_TIMEOUT, maintenance.status())
                    .await
                    .ok(),
            )
        }))
        .await;
        for (i, take_out) in members_to_change(&answers, &removed) {
            let endpoint = &probes[i].0;
            let done = if take_out {
                client.remove_endpoint(endpoint).await
            } else {
                client.add_endpoint(endpoint).await
            };
            match done {
                Ok(()) if take_out => {
                    warn!(endpoint = %endpoint, timeout = ?MEMBER_PROBE_TIMEOUT, "etcd member does not answer; sending requests to the others until it does");
                }
                Ok(()) => {
                    info!(endpoint = %endpoint, "etcd member answers again; sending it requests")
                }
                Err(e) => {
                    warn!(endpoint = %endpoint, error = %e, "cannot change the etcd endpoints in use");
                    continue;
                }
            }
            removed[i] = take_out;
        }
    }
}

/// Whether a status probe got an answer from the member: any answer but a timeout or a
/// failed connection (an error status from etcd itself, say for missing credentials,
/// is an answer too).
pub(super) fn answers_status<T>(probe: Option<Result<T, etcd_client::Error>>) -> bool {
    match probe {
        None => false,
        Some(Ok(_)) => true,
        Some(Err(etcd_client::Error::GRpcStatus(s))) => !matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        Some(Err(_)) => false,
    }
}

/// Which endpoints to take out (`true`) of the balanced channel or put back (`false`),
/// given which members answered and which are out now. Members that answer are always
/// in; the others are out, unless none answers: then every endpoint goes back in, so that
/// requests find whichever member comes back first.
pub(super) fn members_to_change(answered: &[bool], removed: &[bool]) -> Vec<(usize, bool)> {
    let none = !answered.iter().any(|&a| a);
    answered
        .iter()
        .zip(removed)
        .enumerate()
        .filter_map(|(i, (&answers, &out))| {
            let want_out = !answers && !none;
            (want_out != out).then_some((i, want_out))
        })
        .collect()
}

/// Tries for a request that fails before being sent: one with a single endpoint (nothing
/// else to pick), else four per endpoint, so that a random pick misses a dead member with
/// near certainty while all members down still fails within milliseconds.
pub(super) fn unsent_tries(endpoints: usize) -> usize {
    if endpoints <= 1 {
        1
    } else {
        4 * endpoints
    }
}

/// Pause between tries of a request that was never sent.
pub(super) const UNSENT_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Runs one etcd request made by `request` under `limit`, trying it up to `tries` times
/// while it fails before being sent (see the module notes), and maps its error; `lease`
/// as for [`within_lease`].
pub(super) async fn request<T, F, Fut>(
    tries: usize,
    limit: Duration,
    what: &str,
    lease: Option<LeaseId>,
    mut request: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tried = 0;
    loop {
        tried += 1;
        match tokio::time::timeout_at(deadline, request()).await {
            Ok(Err(e)) if tried < tries && never_sent(&e) => {
                tokio::time::sleep(UNSENT_RETRY_PAUSE).await;
            }
            Ok(result) => return result.map_err(|e| store_error(e, lease)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd {what} timed out after {limit:?}"
                )))
            }
        }
    }
}

/// Whether a request failed before it left: no connection to the endpoint it was given
/// (tonic's `ConnectError` behind an `Unavailable` status).
pub(super) fn never_sent(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}
