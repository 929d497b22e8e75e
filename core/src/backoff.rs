//! Doubling backoff with jitter: the one retry schedule of every loop that waits for
//! something to come back (a controller, etcd, a watch stream).
//!
//! Each delay is drawn uniformly from the upper half of the current step ("equal jitter"),
//! so a thousand agents that lost their controller at the same moment do not all return at
//! the same moment either, while none waits less than half a step. The step doubles up to
//! `max` and starts over after [`Backoff::reset`] (a success).

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps of `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            step: initial,
        }
    }

    /// The next delay to wait, with jitter; the step doubles for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// The next delay when the other side said how long to wait (a retry pushback):
    /// at least `hint`, spread over up to half as much again so that everyone told the
    /// same does not come back at the same moment; at least the next delay too.
    pub fn next_delay_after(&mut self, hint: Option<Duration>) -> Duration {
        let own = self.next_delay();
        match hint {
            Some(h) => own.max(h + (h / 2).mul_f64(rand::rng().random::<f64>())),
            None => own,
        }
    }

    /// The current step (the most the next delay can be).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// Back to the initial step, after a success.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut steps = Vec::new();
        for _ in 0..6 {
            let step = b.step();
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} for step {step:?}");
            steps.push(step.as_millis());
        }
        assert_eq!(steps, [100, 200, 400, 800, 800, 800]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn a_pushback_is_waited_at_least_and_spread() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..50 {
            let d = b.next_delay_after(Some(Duration::from_secs(2)));
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(3),
                "{d:?}"
            );
            b.reset();
        }
        let d = b.next_delay_after(None);
        assert!(d <= Duration::from_millis(100), "{d:?}");
    }

    #[test]
    fn a_cap_below_the_start_is_the_start() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.step(), Duration::from_secs(2));
    }
}
