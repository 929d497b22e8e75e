//! Per-identity rate limit of the listing calls (ListLeases, GetConfig, WatchLeases): a
//! token bucket per client certificate identity.
//!
//! A ListLeases costs etcd a range read of every lease (and a lookup of each lease whose
//! expiry this controller does not know yet), so one node in a loop could keep etcd busy
//! for everyone. Each identity gets `burst` calls at once and
//! `rate` more per second; a call beyond that is refused with RESOURCE_EXHAUSTED and the
//! time to wait. Admin identities are not limited (they may already do anything), and
//! neither are plaintext clients (`--insecure`), which have no identity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::ControlError;

/// Buckets kept before full (idle) ones are dropped.
const PRUNE_ABOVE: usize = 4096;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` calls per second, in bursts of up to `burst`; both must be positive.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        assert!(rate > 0.0 && burst > 0, "rate and burst must be positive");
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::default(),
        }
    }

    /// Takes one call from `identity`'s bucket, or says how long until one is available.
    pub fn check(&self, identity: &str) -> Result<(), ControlError> {
        self.check_at(identity, Instant::now())
    }

    fn check_at(&self, identity: &str, now: Instant) -> Result<(), ControlError> {
        let burst = f64::from(self.burst);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() > PRUNE_ABOVE && !buckets.contains_key(identity) {
            let rate = self.rate;
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(identity.to_string()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - b.tokens) / self.rate;
        Err(ControlError::RateLimited {
            identity: identity.to_string(),
            rate: self.rate,
            burst: self.burst,
            retry_after: Duration::from_secs_f64(wait).max(Duration::from_millis(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_per_identity() {
        let l = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at("node-a", t0).unwrap();
        }
        let e = l.check_at("node-a", t0).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"node-a\"") && msg.contains("--list-rate") && msg.contains("500 ms"),
            "{msg}"
        );
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        // Another identity has its own bucket.
        l.check_at("node-b", t0).unwrap();
        // Half a second later one more call is allowed, and only one.
        let t1 = t0 + Duration::from_millis(500);
        l.check_at("node-a", t1).unwrap();
        assert!(l.check_at("node-a", t1).is_err());
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            l.check_at("node-a", t2).unwrap();
        }
        assert!(l.check_at("node-a", t2).is_err());
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let l = RateLimiter::new(1.0, 1);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            l.check_at(&format!("n{i}"), t0).unwrap();
        }
        l.check_at("late", t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(l.buckets.lock().unwrap().len(), 1);
    }
}
