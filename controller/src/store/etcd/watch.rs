//! What one etcd watch response means for the store's watch stream.

use super::*;

/// What one etcd watch response means for our stream.
pub(super) enum WatchStep {
    /// Nothing for the caller (the "created" acknowledgement).
    Skip,
    Batch(WatchBatch),
    /// The watch is over; the error is the last item.
    End(StoreError),
}

pub(super) fn watch_step(resp: &WatchResponse, requested: i64) -> WatchStep {
    if resp.compact_revision() > 0 {
        return WatchStep::End(StoreError::Compacted {
            requested,
            compact_revision: resp.compact_revision(),
        });
    }
    if resp.canceled() {
        let reason = match resp.cancel_reason() {
            "" => "no reason given",
            r => r,
        };
        if is_access_denied(Code::Unknown, reason) {
            return WatchStep::End(StoreError::AccessDenied(format!(
                "etcd canceled the watch: {reason}"
            )));
        }
        return WatchStep::End(StoreError::Unavailable(format!(
            "etcd canceled the watch: {reason}"
        )));
    }
    if resp.created() && resp.events().is_empty() {
        return WatchStep::Skip;
    }
    let events = resp
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            Some(match event.event_type() {
                EventType::Put => StoreEvent::Put(key_value(kv)),
                EventType::Delete => StoreEvent::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    revision: kv.mod_revision(),
                },
            })
        })
        .collect::<Vec<_>>();
    let header = resp.header().map(|h| h.revision()).unwrap_or_default();
    let revision = events
        .iter()
        .map(StoreEvent::revision)
        .fold(header, i64::max);
    WatchStep::Batch(WatchBatch { events, revision })
}

/// The state of one watch stream: the etcd stream (dropping it cancels the etcd watch) and
/// an answer already read while waiting for "created".
pub(super) struct WatchState {
    pub(super) etcd: etcd_client::WatchStream,
    pub(super) requested: i64,
    pub(super) first: Option<WatchStep>,
}

pub(super) async fn next_watch_item(
    state: Option<WatchState>,
) -> Option<(Result<WatchBatch, StoreError>, Option<WatchState>)> {
    // `None` once the stream yielded its final error.
    let mut state = state?;
    let mut step = state.first.take();
    loop {
        let current = match step.take() {
            Some(s) => s,
            None => match state.etcd.message().await {
                Ok(Some(resp)) => watch_step(&resp, state.requested),
                Ok(None) => WatchStep::End(StoreError::Unavailable(
                    "etcd closed the watch stream".into(),
                )),
                Err(e) => WatchStep::End(StoreError::Unavailable(format!(
                    "etcd watch stream broke: {e}"
                ))),
            },
        };
        match current {
            WatchStep::Skip => continue,
            WatchStep::Batch(batch) => return Some((Ok(batch), Some(state))),
            WatchStep::End(e) => return Some((Err(e), None)),
        }
    }
}
