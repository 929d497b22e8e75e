//! `overlayctl watch`: follow lease changes.
//!
//! The stream starts with a snapshot, and the controller sends another whenever it cannot
//! replay what a client missed (a slow client, or a compaction). Printing every snapshot
//! in full would repeat leases the reader already saw, so the printed state is mirrored
//! in a [`LeaseCache`] and a later snapshot prints only its difference from that state,
//! as `added`/`removed` lines: the output is always a plain event log whose replay gives
//! the current leases.
//!
//! Events are printed as received until the first snapshot arrives (possible with
//! `--after-revision`, when the controller can replay): with nothing mirrored yet, there is
//! nothing to compare them with. After that, an event that changes nothing already
//! printed is dropped.

use anyhow::anyhow;
use clap::Args;
use overlay_core::watch::{LeaseCache, LeaseEvent};
use overlay_proto::v1;
use overlay_proto::v1::watch_leases_response::Kind;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{self, ControllerUrls};
use crate::output::{self, change_name, lease_json, Format, WatchEventJson};

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Resume after this revision (0: start with a snapshot of every lease)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(0..)
    )]
    pub after_revision: i64,
}

/// How long `watch` keeps trying to reconnect before it gives up.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn run(
    args: WatchArgs,
    controllers: &ControllerUrls,
    format: Format,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut printer = WatchPrinter::new(format);
    let mut after = args.after_revision;
    let mut stream = open(controllers, after).await?;
    loop {
        let broke = loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                message = stream.message() => match message {
                    Ok(Some(message)) => {
                        for line in printer.lines_for(message)? {
                            output::print(&line)?;
                        }
                    }
                    // The controller ended the stream (it is shutting down).
                    Ok(None) => break anyhow!("the controller closed the watch"),
                    Err(status) if client::is_transport_failure(&status) => break anyhow!("{}", status.message()),
                    Err(status) => return Err(anyhow!("{}", status.message()).context("the watch stream failed")),
                },
            }
        };
        // Resume after the last revision printed, from any controller of the list: the
        // controller replays what was missed, or sends a snapshot the printer diffs.
        after = printer.revision().max(after);
        eprintln!(
            "overlayctl: watch: {}; reconnecting",
            output::escape(&format!("{broke:#}"))
        );
        let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
        stream = loop {
            match open(controllers, after).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("the watch stream failed and no controller came back"))
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        };
    }
}

/// Connects and opens a watch after `after`.
async fn open(
    controllers: &ControllerUrls,
    after: i64,
) -> anyhow::Result<tonic::Streaming<v1::WatchLeasesResponse>> {
    let ctl = client::connect(controllers).await?;
    ctl.call(ctl.agent().watch_leases(v1::WatchLeasesRequest {
        after_revision: after,
    }))
    .await
}

/// Turns stream messages into output lines, remembering what was printed.
pub struct WatchPrinter {
    format: Format,
    printed: LeaseCache,
    had_snapshot: bool,
}

impl WatchPrinter {
    pub fn new(format: Format) -> Self {
        WatchPrinter {
            format,
            printed: LeaseCache::new(0),
            had_snapshot: false,
        }
    }

    /// The revision of the last message printed (0 before any).
    pub fn revision(&self) -> i64 {
        self.printed.revision()
    }

    /// The lines (each ending in a newline) that `message` adds to the output.
    pub fn lines_for(&mut self, message: v1::WatchLeasesResponse) -> anyhow::Result<Vec<String>> {
        let invalid = |e: overlay_proto::InvalidMessage| {
            anyhow!("the controller sent an invalid watch message: {e}")
        };
        match message.kind {
            Some(Kind::Snapshot(snapshot)) => {
                let leases = snapshot
                    .leases
                    .iter()
                    .map(overlay_proto::lease_from_proto)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(invalid)?;
                self.had_snapshot = true;
                let diff = self.printed.resync(leases, snapshot.revision);
                Ok(diff.iter().map(|e| self.line(e)).collect())
            }
            Some(Kind::Event(event)) => {
                let event = overlay_proto::event_from_proto(&event).map_err(invalid)?;
                let changed = self.printed.apply(&event).is_some();
                if changed || !self.had_snapshot {
                    Ok(vec![self.line(&event)])
                } else {
                    Ok(vec![])
                }
            }
            None => Ok(vec![]),
        }
    }

    fn line(&self, event: &LeaseEvent) -> String {
        let kind = change_name(event.kind);
        match self.format {
            Format::Json => {
                let json = WatchEventJson {
                    kind,
                    revision: event.revision,
                    lease: lease_json(&event.lease, None),
                };
                output::json_line(&json) + "\n"
            }
            Format::Table => {
                let r = &event.lease.record;
                format!(
                    "{kind:<7}  {:<18}  {:<16}  {}\n",
                    event.lease.subnets_text(),
                    output::escape(&r.node),
                    event.lease.public_text()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::lease;
    use overlay_core::watch::ChangeKind;
    use overlay_core::Lease;

    fn snapshot(revision: i64, leases: &[Lease]) -> v1::WatchLeasesResponse {
        overlay_proto::snapshot_to_proto(revision, leases)
    }

    fn event(revision: i64, kind: ChangeKind, lease: Lease) -> v1::WatchLeasesResponse {
        overlay_proto::event_to_proto(&LeaseEvent {
            revision,
            kind,
            lease,
        })
    }

    #[test]
    fn snapshot_then_events_then_resync_diff() {
        let a = lease("10.244.1.0/24", "a", false);
        let b = lease("10.244.2.0/24", "b", false);
        let c = lease("10.244.3.0/24", "c", false);
        let mut p = WatchPrinter::new(Format::Table);
        assert_eq!(
            p.lines_for(snapshot(10, &[b.clone(), a.clone()])).unwrap(),
            vec![
                "added    10.244.1.0/24       a                 192.0.2.11\n",
                "added    10.244.2.0/24       b                 192.0.2.11\n",
            ]
        );
        assert_eq!(
            p.lines_for(event(11, ChangeKind::Added, c.clone()))
                .unwrap(),
            vec!["added    10.244.3.0/24       c                 192.0.2.11\n"]
        );
        // A duplicate of what was printed adds nothing.
        assert!(p
            .lines_for(event(12, ChangeKind::Added, c.clone()))
            .unwrap()
            .is_empty());
        // A resync snapshot: a is gone, b is unchanged, c changed owner.
        let c2 = lease("10.244.3.0/24", "c2", false);
        assert_eq!(
            p.lines_for(snapshot(20, &[b.clone(), c2])).unwrap(),
            vec![
                "removed  10.244.1.0/24       a                 192.0.2.11\n",
                "added    10.244.3.0/24       c2                192.0.2.11\n",
            ]
        );
        assert!(p
            .lines_for(snapshot(
                21,
                &[b.clone(), lease("10.244.3.0/24", "c2", false)]
            ))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn resumed_streams_print_events_before_any_snapshot() {
        let a = lease("10.244.1.0/24", "a", false);
        let mut p = WatchPrinter::new(Format::Json);
        let lines = p.lines_for(event(7, ChangeKind::Removed, a)).unwrap();
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["type"], "removed");
        assert_eq!(v["revision"], 7);
        assert_eq!(v["lease"]["subnet"], "10.244.1.0/24");
        assert_eq!(v["lease"]["expires_at"], serde_json::Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert!(lines[0].ends_with("}\n") && lines[0].matches('\n').count() == 1);
    }

    #[test]
    fn json_lines_for_a_snapshot() {
        let mut p = WatchPrinter::new(Format::Json);
        let lines = p
            .lines_for(snapshot(5, &[lease("10.244.9.0/24", "n9", true)]))
            .unwrap();
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with(
                r#"{"type":"added","revision":5,"lease":{"subnet":"10.244.9.0/24","ipv6_subnet":null,"node":"n9""#
            ),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn invalid_messages_are_errors() {
        let mut bad = overlay_proto::lease_to_proto(&lease("10.244.1.0/24", "a", false), None);
        bad.public_ip = "x".into();
        let msg = v1::WatchLeasesResponse {
            kind: Some(Kind::Snapshot(v1::LeaseSnapshot {
                revision: 1,
                leases: vec![bad],
            })),
        };
        let e = WatchPrinter::new(Format::Table).lines_for(msg).unwrap_err();
        assert!(e.to_string().contains("public_ip"), "{e}");
    }
}
